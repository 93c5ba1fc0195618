using Nbd.Kernel.Interop;

namespace Nbd.Kernel;

/// <summary>
/// What fstat(2) says identifies an open file: its device and inode numbers (st_dev, st_ino). systemd names the stream
/// it connected a service's stdout/stderr to this way in $JOURNAL_STREAM ("DEVICE:INODE"), so that a process can tell
/// whether its stderr still is that stream or was redirected (systemd.exec(5)).
/// </summary>
public static class FileIdentity
{
    /// <summary>The device and inode of descriptor <paramref name="fd"/>; null when fstat fails (not an open descriptor).</summary>
    public static unsafe (ulong Device, ulong Inode)? Of(int fd)
    {
        byte* buffer = stackalloc byte[Libc.StatBufferSize];
        if (Libc.Fstat(fd, buffer) < 0)
        {
            return null;
        }

        return (*(ulong*)(buffer + Libc.StatDeviceOffset), *(ulong*)(buffer + Libc.StatInodeOffset));
    }
}

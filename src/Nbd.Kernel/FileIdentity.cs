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
    /// <exception cref="PlatformNotSupportedException">The C library exports no fstat (glibc before 2.33).</exception>
    public static unsafe (ulong Device, ulong Inode)? Of(int fd)
    {
        byte* buffer = stackalloc byte[Libc.StatBufferSize];
        int result;
        try
        {
            result = Libc.Fstat(fd, buffer);
        }
        catch (EntryPointNotFoundException e)
        {
            throw new PlatformNotSupportedException("the C library has no fstat symbol (glibc before 2.33 exports only __fxstat)", e);
        }

        if (result < 0)
        {
            return null;
        }

        return (*(ulong*)(buffer + Libc.StatDeviceOffset), *(ulong*)(buffer + Libc.StatInodeOffset));
    }
}

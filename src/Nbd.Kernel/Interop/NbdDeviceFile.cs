using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace Nbd.Kernel.Interop;

/// <summary>An nbd block device opened O_RDWR|O_CLOEXEC; the only place its descriptor number is visible.</summary>
internal sealed class NbdDeviceFile : INbdDeviceControl
{
    private readonly SafeNbdDeviceHandle _handle;

    private NbdDeviceFile(SafeNbdDeviceHandle handle) => _handle = handle;

    /// <summary>Opens <paramref name="path"/>; returns null and the errno on failure.</summary>
    public static NbdDeviceFile? TryOpen(string path, out int errno)
    {
        int fd = Libc.Open(path, NbdConstants.O_RDWR | NbdConstants.O_CLOEXEC);
        if (fd < 0)
        {
            errno = Marshal.GetLastPInvokeError();
            return null;
        }
        errno = 0;
        return new NbdDeviceFile(new SafeNbdDeviceHandle(fd));
    }

    public int Ioctl(uint request, ulong argument)
    {
        int rc = Libc.Ioctl(_handle, request, checked((nuint)argument));
        return rc < 0 ? Marshal.GetLastPInvokeError() : 0;
    }

    public int IoctlWithSocket(uint request, SafeSocketHandle socket)
    {
        bool added = false;
        try
        {
            socket.DangerousAddRef(ref added);
            nuint fd = (nuint)(nint)socket.DangerousGetHandle();
            int rc = Libc.Ioctl(_handle, request, fd);
            return rc < 0 ? Marshal.GetLastPInvokeError() : 0;
        }
        finally
        {
            if (added)
            {
                socket.DangerousRelease();
            }
        }
    }

    public void Dispose() => _handle.Dispose();
}

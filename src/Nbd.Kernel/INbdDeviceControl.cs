using System.Net.Sockets;

namespace Nbd.Kernel;

/// <summary>
/// The kernel side of one open /dev/nbdN: issues a request and returns 0 or the errno. The real implementation is
/// <see cref="Interop.NbdDeviceFile"/>; tests substitute a recorder so validation and ioctl sequencing are checked
/// without the driver.
/// </summary>
internal interface INbdDeviceControl : IDisposable
{
    int Ioctl(uint request, ulong argument);

    /// <summary>NBD_SET_SOCK: the descriptor of <paramref name="socket"/> is the argument; it stays pinned for the call.</summary>
    int IoctlWithSocket(uint request, SafeSocketHandle socket);
}

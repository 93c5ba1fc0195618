using System.Net.Sockets;
using System.Runtime.InteropServices;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel;

/// <summary>
/// A connected AF_UNIX stream pair: one end goes to the driver (NBD_SET_SOCK, NBD_ATTR_SOCKETS) in place of a
/// server connection, the other to a user-space relay. Both are blocking and close-on-exec. .NET has no socketpair.
/// </summary>
public static class NbdSocketPair
{
    /// <exception cref="NbdKernelException">socketpair(2) failed (errno named, e.g. EMFILE).</exception>
    public static unsafe (Socket KernelEnd, Socket RelayEnd) Create()
    {
        int* fds = stackalloc int[2];
        if (Libc.SocketPair(SocketConstants.AF_UNIX, SocketConstants.SOCK_STREAM | NetlinkConstants.SOCK_CLOEXEC, 0, fds) < 0)
        {
            throw new NbdKernelException("relay", "socketpair(AF_UNIX, SOCK_STREAM)", Marshal.GetLastPInvokeError());
        }

        return (Adopt(fds[0]), Adopt(fds[1]));
    }

    private static Socket Adopt(int fd) => new(new SafeSocketHandle(fd, ownsHandle: true));
}

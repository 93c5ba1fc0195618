using System.Net.Sockets;
using System.Runtime.InteropServices;
using Nbd.Kernel.Netlink;

namespace Nbd.Kernel.Interop;

/// <summary>
/// A NETLINK_GENERIC socket. .NET's Socket cannot create AF_NETLINK sockets, but it can adopt one: socket(2) and
/// bind(2) happen here, after which the descriptor lives in a SafeSocketHandle and receives (including cancellable
/// async ones for multicast events) go through Socket.
/// </summary>
internal sealed class NetlinkSocket : INetlinkTransport
{
    private static readonly TimeSpan ReplyTimeout = TimeSpan.FromSeconds(10);
    private readonly Socket _socket;

    private NetlinkSocket(Socket socket) => _socket = socket;

    public static unsafe NetlinkSocket Open()
    {
        int fd = Libc.Socket(NetlinkConstants.AF_NETLINK, NetlinkConstants.SOCK_RAW | NetlinkConstants.SOCK_CLOEXEC, NetlinkConstants.NETLINK_GENERIC);
        if (fd < 0)
        {
            throw new NbdKernelException("netlink", "socket(AF_NETLINK, NETLINK_GENERIC)", Marshal.GetLastPInvokeError());
        }
        var address = new Libc.SockAddrNetlink { Family = NetlinkConstants.AF_NETLINK };
        if (Libc.Bind(fd, &address, (uint)sizeof(Libc.SockAddrNetlink)) < 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            Libc.Close(fd);
            throw new NbdKernelException("netlink", "bind", errno);
        }
        var socket = new Socket(new SafeSocketHandle(fd, ownsHandle: true)) { ReceiveTimeout = (int)ReplyTimeout.TotalMilliseconds };
        var result = new NetlinkSocket(socket);
        // Best effort: short ACKs plus the kernel's error text ("nbd: must specify ..."); old kernels lack them.
        result.TrySetOption(NetlinkConstants.NETLINK_CAP_ACK, 1);
        result.TrySetOption(NetlinkConstants.NETLINK_EXT_ACK, 1);
        return result;
    }

    public unsafe void Send(ReadOnlySpan<byte> message)
    {
        var kernel = new Libc.SockAddrNetlink { Family = NetlinkConstants.AF_NETLINK };
        fixed (byte* bytes = message)
        {
            nint sent = Libc.SendTo(_socket.SafeHandle, bytes, (nuint)message.Length, 0, &kernel, (uint)sizeof(Libc.SockAddrNetlink));
            if (sent < 0)
            {
                throw new NbdKernelException("netlink", "sendto", Marshal.GetLastPInvokeError());
            }
        }
    }

    public int Receive(Span<byte> buffer)
    {
        try
        {
            return _socket.Receive(buffer);
        }
        catch (SocketException ex) when (ex.SocketErrorCode == SocketError.TimedOut)
        {
            throw new TimeoutException($"The kernel did not answer a netlink request within {ReplyTimeout.TotalSeconds} s.", ex);
        }
    }

    public ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken) =>
        _socket.ReceiveAsync(buffer, SocketFlags.None, cancellationToken);

    public unsafe void JoinGroup(uint groupId)
    {
        if (Libc.SetSockOpt(_socket.SafeHandle, NetlinkConstants.SOL_NETLINK, NetlinkConstants.NETLINK_ADD_MEMBERSHIP, &groupId, sizeof(uint)) < 0)
        {
            throw new NbdKernelException("netlink", "NETLINK_ADD_MEMBERSHIP", Marshal.GetLastPInvokeError());
        }
    }

    public void Dispose() => _socket.Dispose();

    private unsafe void TrySetOption(int name, int value) =>
        _ = Libc.SetSockOpt(_socket.SafeHandle, NetlinkConstants.SOL_NETLINK, name, &value, sizeof(int));
}

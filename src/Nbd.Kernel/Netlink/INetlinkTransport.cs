namespace Nbd.Kernel.Netlink;

/// <summary>
/// A bound NETLINK_GENERIC socket talking to the kernel (port 0). The real one is <see cref="Interop.NetlinkSocket"/>;
/// tests use a scripted fake kernel.
/// </summary>
internal interface INetlinkTransport : IDisposable
{
    void Send(ReadOnlySpan<byte> message);

    /// <summary>Receives one datagram; throws <see cref="TimeoutException"/> when the kernel stays silent.</summary>
    int Receive(Span<byte> buffer);

    ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken);

    /// <summary>NETLINK_ADD_MEMBERSHIP for a multicast group id from CTRL_CMD_GETFAMILY.</summary>
    void JoinGroup(uint groupId);
}

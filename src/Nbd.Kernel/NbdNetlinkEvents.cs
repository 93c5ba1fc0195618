using Nbd.Kernel.Interop;
using Nbd.Kernel.Netlink;
using static Nbd.Kernel.Interop.NetlinkConstants;

namespace Nbd.Kernel;

/// <summary>
/// Membership of the "nbd_mc_group" multicast group. The kernel multicasts NBD_CMD_LINK_DEAD with the device index
/// when a socket of a netlink-configured device dies (not after a requested disconnect); the usual answer is a new
/// connection handed over with <see cref="NbdNetlink.Reconfigure"/>.
/// </summary>
public sealed class NbdNetlinkEvents : IDisposable
{
    private readonly GenericNetlinkClient _client;
    private readonly ushort _familyId;
    private readonly Queue<int> _pending = new();
    private readonly byte[] _buffer = new byte[GenericNetlinkClient.MaxDatagram];

    private NbdNetlinkEvents(GenericNetlinkClient client, ushort familyId)
    {
        _client = client;
        _familyId = familyId;
    }

    /// <exception cref="NbdKernelException">ENOENT when the nbd module is not loaded.</exception>
    public static NbdNetlinkEvents Subscribe() => Subscribe(NetlinkSocket.Open());

    internal static NbdNetlinkEvents Subscribe(INetlinkTransport transport)
    {
        var client = new GenericNetlinkClient(transport);
        try
        {
            var family = GenericNetlinkFamily.Resolve(client, NBD_GENL_FAMILY_NAME);
            if (!family.MulticastGroups.TryGetValue(NBD_GENL_MCAST_GROUP_NAME, out uint group))
            {
                throw new NbdKernelException("netlink nbd", "join " + NBD_GENL_MCAST_GROUP_NAME, Errno.ENOENT, "the nbd family has no such multicast group");
            }
            transport.JoinGroup(group);
            return new NbdNetlinkEvents(client, family.Id);
        }
        catch
        {
            client.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Returns the index from the next NBD_CMD_LINK_DEAD (events that arrived earlier are queued, not lost).
    /// Not for concurrent callers.
    /// </summary>
    public async Task<int> WaitForLinkDeadAsync(CancellationToken cancellationToken)
    {
        while (_pending.Count == 0)
        {
            int received = await _client.Transport.ReceiveAsync(_buffer, cancellationToken);
            List<NetlinkMessage> messages;
            try
            {
                messages = NetlinkMessage.ParseAll(_buffer.AsSpan(0, received).ToArray());
                foreach (var message in messages)
                {
                    if (message.Type == _familyId && NbdNetlinkMessages.ParseLinkDead(message, _familyId) is int index)
                    {
                        _pending.Enqueue(index);
                    }
                }
            }
            catch (NetlinkProtocolException ex)
            {
                throw new NbdKernelException("netlink nbd", "receive NBD_CMD_LINK_DEAD", Errno.EBADMSG, ex.Message, ex);
            }
        }
        return _pending.Dequeue();
    }

    public void Dispose() => _client.Dispose();
}

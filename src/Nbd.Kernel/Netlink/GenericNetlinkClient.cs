using Nbd.Kernel.Interop;
using static Nbd.Kernel.Interop.NetlinkConstants;

namespace Nbd.Kernel.Netlink;

/// <summary>Request/ACK exchange over a transport: every request carries NLM_F_ACK and ends at its NLMSG_ERROR.</summary>
internal sealed class GenericNetlinkClient : IDisposable
{
    /// <summary>
    /// Largest datagram accepted. nbd replies are tiny (a STATUS entry is 20 bytes per device, so this covers thousands
    /// of devices); a longer datagram arrives truncated and fails to parse rather than being buffered.
    /// </summary>
    public const int MaxDatagram = 64 * 1024;

    private readonly INetlinkTransport _transport;
    private readonly byte[] _buffer = new byte[MaxDatagram];
    private readonly Lock _lock = new();
    private uint _sequence;

    public GenericNetlinkClient(INetlinkTransport transport) => _transport = transport;

    public INetlinkTransport Transport => _transport;

    public uint NextSequence() => Interlocked.Increment(ref _sequence);

    /// <summary>
    /// Sends <paramref name="message"/> and collects the replies with its sequence number up to the ACK.
    /// A negative ACK becomes <see cref="NbdKernelException"/> with the kernel's extended-ack text when it sent one.
    /// </summary>
    public List<NetlinkMessage> Request(byte[] message, uint sequence, string device, string operation, Func<int, string?>? hint = null)
    {
        lock (_lock)
        {
            _transport.Send(message);
            var replies = new List<NetlinkMessage>();
            while (true)
            {
                int received = _transport.Receive(_buffer);
                List<NetlinkMessage> messages;
                try
                {
                    messages = NetlinkMessage.ParseAll(_buffer.AsSpan(0, received).ToArray());
                }
                catch (NetlinkProtocolException ex)
                {
                    throw new NbdKernelException(device, operation, Errno.EBADMSG, ex.Message, ex);
                }
                foreach (var reply in messages)
                {
                    if (reply.Sequence != sequence)
                    {
                        continue; // a late answer to an earlier, abandoned request, or a multicast event
                    }
                    if (reply.Type == NLMSG_ERROR)
                    {
                        NetlinkAck ack;
                        try
                        {
                            ack = NetlinkAck.Parse(reply);
                        }
                        catch (NetlinkProtocolException ex)
                        {
                            throw new NbdKernelException(device, operation, Errno.EBADMSG, ex.Message, ex);
                        }
                        if (ack.Errno != 0)
                        {
                            throw new NbdKernelException(device, operation, ack.Errno, ack.ExtendedMessage ?? hint?.Invoke(ack.Errno));
                        }
                        return replies;
                    }
                    if (reply.Type == NLMSG_DONE)
                    {
                        return replies;
                    }
                    replies.Add(reply);
                }
            }
        }
    }

    public void Dispose() => _transport.Dispose();
}

using System.Threading.Channels;
using Nbd.Kernel.Interop;
using Nbd.Kernel.Netlink;

namespace Nbd.Kernel.Tests.Netlink;

/// <summary>A scripted kernel: each sent request is parsed and answered by <see cref="Handler"/>.</summary>
internal sealed class FakeNetlinkKernel : INetlinkTransport
{
    private readonly Channel<byte[]> _datagrams = Channel.CreateUnbounded<byte[]>();

    public const ushort NbdFamilyId = 0x1a;
    public const uint McastGroup = 11;

    public List<byte[]> Sent { get; } = [];

    public List<uint> JoinedGroups { get; } = [];

    public bool Disposed { get; private set; }

    /// <summary>Answers one request with zero or more datagrams; defaults to the family lookup plus a plain ACK.</summary>
    public Func<NetlinkMessage, IEnumerable<byte[]>> Handler { get; set; }

    public FakeNetlinkKernel() => Handler = DefaultHandler;

    public IEnumerable<byte[]> DefaultHandler(NetlinkMessage request) =>
        request.Type == NetlinkConstants.GENL_ID_CTRL
            ? [FamilyReply(request.Sequence), Ack(request, 0)]
            : [Ack(request, 0)];

    public void Send(ReadOnlySpan<byte> message)
    {
        var bytes = message.ToArray();
        Sent.Add(bytes);
        var request = Assert.Single(NetlinkMessage.ParseAll(bytes));
        Assert.Equal(NetlinkConstants.NLM_F_REQUEST | NetlinkConstants.NLM_F_ACK, request.Flags);
        foreach (var datagram in Handler(request))
        {
            Push(datagram);
        }
    }

    public void Push(byte[] datagram) => Assert.True(_datagrams.Writer.TryWrite(datagram));

    public int Receive(Span<byte> buffer)
    {
        if (!_datagrams.Reader.TryRead(out var datagram))
        {
            throw new TimeoutException("fake kernel has nothing to say");
        }
        datagram.CopyTo(buffer);
        return datagram.Length;
    }

    public async ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken)
    {
        var datagram = await _datagrams.Reader.ReadAsync(cancellationToken);
        datagram.CopyTo(buffer);
        return datagram.Length;
    }

    public void JoinGroup(uint groupId) => JoinedGroups.Add(groupId);

    public void Dispose() => Disposed = true;

    public static byte[] FamilyReply(uint sequence) =>
        new NetlinkMessageBuilder(NetlinkConstants.GENL_ID_CTRL, 0, sequence)
            .GenericHeader(1, 2)
            .AddUInt16(NetlinkConstants.CTRL_ATTR_FAMILY_ID, NbdFamilyId)
            .AddString(NetlinkConstants.CTRL_ATTR_FAMILY_NAME, "nbd")
            .BeginNested(NetlinkConstants.CTRL_ATTR_MCAST_GROUPS)
            .BeginNested(1)
            .AddString(NetlinkConstants.CTRL_ATTR_MCAST_GRP_NAME, "nbd_mc_group")
            .AddUInt32(NetlinkConstants.CTRL_ATTR_MCAST_GRP_ID, McastGroup)
            .EndNested()
            .EndNested()
            .ToArray();

    /// <summary>NLMSG_ERROR echoing the request header (capped); <paramref name="errno"/> 0 is a plain ACK.</summary>
    public static byte[] Ack(NetlinkMessage request, int errno, string? extendedMessage = null)
    {
        var builder = new NetlinkMessageBuilder(NetlinkConstants.NLMSG_ERROR,
            (ushort)(NetlinkConstants.NLM_F_CAPPED | (extendedMessage is null ? 0 : NetlinkConstants.NLM_F_ACK_TLVS)), request.Sequence);
        var bytes = builder.ToArray().ToList();
        var body = new byte[4 + 16];
        BitConverter.TryWriteBytes(body.AsSpan(0), -errno);
        BitConverter.TryWriteBytes(body.AsSpan(4), (uint)(16 + request.Payload.Length));
        BitConverter.TryWriteBytes(body.AsSpan(8), request.Type);
        BitConverter.TryWriteBytes(body.AsSpan(10), request.Flags);
        BitConverter.TryWriteBytes(body.AsSpan(12), request.Sequence);
        bytes.AddRange(body);
        if (extendedMessage is not null)
        {
            var text = System.Text.Encoding.UTF8.GetBytes(extendedMessage + "\0");
            int length = 4 + text.Length;
            bytes.AddRange(BitConverter.GetBytes((ushort)length));
            bytes.AddRange(BitConverter.GetBytes(NetlinkConstants.NLMSGERR_ATTR_MSG));
            bytes.AddRange(text);
            while (bytes.Count % 4 != 0)
            {
                bytes.Add(0);
            }
        }
        var result = bytes.ToArray();
        BitConverter.TryWriteBytes(result.AsSpan(0), (uint)result.Length);
        return result;
    }
}

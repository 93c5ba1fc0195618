using System.Net;
using System.Net.Sockets;
using Nbd.Kernel.Interop;
using Nbd.Kernel.Netlink;

namespace Nbd.Kernel.Tests.Netlink;

public sealed class NbdNetlinkTests
{
    private static (Socket Client, Socket Server) ConnectedPair()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        client.Connect(listener.LocalEndPoint!);
        return (client, listener.Accept());
    }

    [Fact]
    public void Open_ResolvesFamilyThroughController()
    {
        var kernel = new FakeNetlinkKernel();
        using var netlink = NbdNetlink.Open(kernel, 4096);
        Assert.Equal(FakeNetlinkKernel.NbdFamilyId, netlink.FamilyId);
        var request = Assert.Single(NetlinkMessage.ParseAll(Assert.Single(kernel.Sent)));
        Assert.Equal(NetlinkConstants.GENL_ID_CTRL, request.Type);
        Assert.Equal("nbd", request.GenericAttributes().Find(NetlinkConstants.CTRL_ATTR_FAMILY_NAME)?.AsString());
    }

    [Fact]
    public void Open_FamilyMissing_EnoentWithModprobeHint()
    {
        var kernel = new FakeNetlinkKernel();
        kernel.Handler = request => [FakeNetlinkKernel.Ack(request, Errno.ENOENT)];
        var ex = Assert.Throws<NbdKernelException>(() => NbdNetlink.Open(kernel, 4096));
        Assert.Equal(Errno.ENOENT, ex.Errno);
        Assert.Equal("CTRL_CMD_GETFAMILY", ex.Operation);
        Assert.Contains("modprobe nbd", ex.Message, StringComparison.Ordinal);
        Assert.True(kernel.Disposed);
    }

    [Fact]
    public void Connect_KernelPicksIndex_ReturnsIndexFromReply_SendsSocketDescriptor()
    {
        var kernel = new FakeNetlinkKernel();
        using var netlink = NbdNetlink.Open(kernel, 4096);
        kernel.Handler = request =>
        [
            FakeNetlinkKernel.Ack(request with { Sequence = request.Sequence - 1 }, 0), // stale ACK of an older request: ignored
            new NetlinkMessageBuilder(FakeNetlinkKernel.NbdFamilyId, 0, request.Sequence)
                .GenericHeader(NetlinkConstants.NBD_CMD_CONNECT, 1).AddUInt32(NetlinkConstants.NBD_ATTR_INDEX, 6).ToArray(),
            FakeNetlinkKernel.Ack(request, 0),
        ];
        var (client, server) = ConnectedPair();
        using (client)
        using (server)
        {
            int index = netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = 1 << 20, Sockets = [client], Timeout = TimeSpan.FromSeconds(5) });
            Assert.Equal(6, index);

            var sent = Assert.Single(NetlinkMessage.ParseAll(kernel.Sent[^1]));
            Assert.Equal(NetlinkConstants.NBD_CMD_CONNECT, sent.GenericCommand);
            var attributes = sent.GenericAttributes();
            Assert.Null(attributes.Find(NetlinkConstants.NBD_ATTR_INDEX));
            Assert.Equal(5ul, attributes.Find(NetlinkConstants.NBD_ATTR_TIMEOUT)?.AsUInt64());
            var fd = attributes.Find(NetlinkConstants.NBD_ATTR_SOCKETS)!.Value.AsNested().Single().AsNested().Find(NetlinkConstants.NBD_SOCK_FD)!.Value.AsUInt32();
            Assert.Equal((uint)(nint)client.SafeHandle.DangerousGetHandle(), fd);
        }
    }

    [Fact]
    public void Connect_Invalid_RefusedBeforeKernel()
    {
        var kernel = new FakeNetlinkKernel();
        using var netlink = NbdNetlink.Open(kernel, 4096);
        int sentBefore = kernel.Sent.Count;
        using var udp = new Socket(AddressFamily.InterNetwork, SocketType.Dgram, ProtocolType.Udp);
        Assert.Throws<ArgumentException>(() => netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = 4096, Sockets = [] }));
        Assert.Throws<ArgumentException>(() => netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = 4096, Sockets = [udp] }));
        var (client, server) = ConnectedPair();
        using (client)
        using (server)
        {
            Assert.Throws<ArgumentOutOfRangeException>(() => netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = 4096, BlockSize = 1000, Sockets = [client] }));
            Assert.Throws<ArgumentOutOfRangeException>(() => netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = 4096, Timeout = TimeSpan.FromMilliseconds(10), Sockets = [client] }));

            // A loff_t is signed (the kernel answers a bare EINVAL); a partial last block fails its reads.
            Assert.Throws<ArgumentOutOfRangeException>(() => netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = (ulong)long.MaxValue + 1, Sockets = [client] }));
            var partial = Assert.Throws<ArgumentOutOfRangeException>(() => netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = 4096 + 512, BlockSize = 4096, Sockets = [client] }));
            Assert.Contains("no whole number of 4096-byte blocks", partial.Message, StringComparison.Ordinal);
            Assert.Throws<ArgumentOutOfRangeException>(() => netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = 4096 + 512, Sockets = [client] })); // default 1024

            // One connection in two slots.
            Assert.Throws<ArgumentException>(() => netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = 4096, Sockets = [client, client] }));
        }
        Assert.Equal(sentBefore, kernel.Sent.Count);
    }

    [Theory]
    [InlineData("", "is empty")]
    [InlineData("a\0b", "control character")]
    [InlineData("name\n", "control character")]
    [InlineData(" name", "white space")]
    [InlineData("name ", "white space")]
    public void ConnectAndReconfigure_BackendIdentifierSysfsCannotGiveBack_RefusedBeforeKernel(string identifier, string why)
    {
        var kernel = new FakeNetlinkKernel();
        using var netlink = NbdNetlink.Open(kernel, 4096);
        int sentBefore = kernel.Sent.Count;
        var (client, server) = ConnectedPair();
        using (client)
        using (server)
        {
            var connect = Assert.Throws<ArgumentException>(() => netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = 4096, Sockets = [client], BackendIdentifier = identifier }));
            Assert.Contains(why, connect.Message, StringComparison.Ordinal);
            Assert.Throws<ArgumentException>(() => netlink.Reconfigure(new NbdNetlinkReconfigureRequest { Index = 0, BackendIdentifier = identifier }));
            Assert.Throws<ArgumentException>(() => netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = 4096, Sockets = [client], BackendIdentifier = new string('x', 4096) }));
        }
        Assert.Equal(sentBefore, kernel.Sent.Count);
    }

    [Fact]
    public void Connect_CallersReceiveTimeout_ClearedBeforeTheKernelGetsTheSocket()
    {
        var kernel = new FakeNetlinkKernel();
        using var netlink = NbdNetlink.Open(kernel, 4096);
        var (client, server) = ConnectedPair();
        using (client)
        using (server)
        {
            NbdSocketTimeout.Set(client, TimeSpan.FromSeconds(3), NbdSocketTimeout.Direction.Receive);
            kernel.Handler = request => [
                new NetlinkMessageBuilder(FakeNetlinkKernel.NbdFamilyId, 0, request.Sequence)
                    .GenericHeader(NetlinkConstants.NBD_CMD_CONNECT, 1).AddUInt32(NetlinkConstants.NBD_ATTR_INDEX, 3).ToArray(),
                FakeNetlinkKernel.Ack(request, 0),
            ];

            Assert.Equal(3, netlink.Connect(new NbdNetlinkConnectRequest { SizeBytes = 4096, Sockets = [client] }));
            Assert.Equal(TimeSpan.Zero, NbdSocketTimeout.Read(client, NbdSocketTimeout.Direction.Receive));
        }
    }

    [Fact]
    public void Disconnect_NegativeAck_TypedExceptionWithKernelText()
    {
        var kernel = new FakeNetlinkKernel();
        using var netlink = NbdNetlink.Open(kernel, 4096);
        kernel.Handler = request => [FakeNetlinkKernel.Ack(request, Errno.EINVAL, "nbd: device not found")];
        var ex = Assert.Throws<NbdKernelException>(() => netlink.Disconnect(3));
        Assert.Equal("/dev/nbd3: NBD_CMD_DISCONNECT failed: EINVAL (Invalid argument): nbd: device not found", ex.Message);
        Assert.Equal("nbd: device not found", ex.Detail);
    }

    [Fact]
    public void Reconfigure_Ack_SendsIndexAndClientFlags()
    {
        var kernel = new FakeNetlinkKernel();
        using var netlink = NbdNetlink.Open(kernel, 4096);
        netlink.Reconfigure(new NbdNetlinkReconfigureRequest { Index = 2, ClientFlags = 0, DeadConnectionTimeout = TimeSpan.FromSeconds(60) });
        var sent = Assert.Single(NetlinkMessage.ParseAll(kernel.Sent[^1]));
        Assert.Equal(NetlinkConstants.NBD_CMD_RECONFIGURE, sent.GenericCommand);
        var attributes = sent.GenericAttributes();
        Assert.Equal(2u, attributes.Find(NetlinkConstants.NBD_ATTR_INDEX)?.AsUInt32());
        Assert.Equal(0ul, attributes.Find(NetlinkConstants.NBD_ATTR_CLIENT_FLAGS)?.AsUInt64());
        Assert.Equal(60ul, attributes.Find(NetlinkConstants.NBD_ATTR_DEAD_CONN_TIMEOUT)?.AsUInt64());
        Assert.Null(attributes.Find(NetlinkConstants.NBD_ATTR_SOCKETS));
    }

    [Fact]
    public void Status_ParsesDeviceList()
    {
        var kernel = new FakeNetlinkKernel();
        using var netlink = NbdNetlink.Open(kernel, 4096);
        kernel.Handler = request =>
        [
            new NetlinkMessageBuilder(FakeNetlinkKernel.NbdFamilyId, 0, request.Sequence)
                .GenericHeader(NetlinkConstants.NBD_CMD_STATUS, 1)
                .BeginNested(NetlinkConstants.NBD_ATTR_DEVICE_LIST)
                .BeginNested(NetlinkConstants.NBD_DEVICE_ITEM).AddUInt32(NetlinkConstants.NBD_DEVICE_INDEX, 0).AddUInt8(NetlinkConstants.NBD_DEVICE_CONNECTED, 0).EndNested()
                .BeginNested(NetlinkConstants.NBD_DEVICE_ITEM).AddUInt32(NetlinkConstants.NBD_DEVICE_INDEX, 1).AddUInt8(NetlinkConstants.NBD_DEVICE_CONNECTED, 1).EndNested()
                .EndNested().ToArray(),
            FakeNetlinkKernel.Ack(request, 0),
        ];
        Assert.Equal([new NbdNetlinkDeviceStatus(0, false), new NbdNetlinkDeviceStatus(1, true)], netlink.Status());
    }

    [Fact]
    public async Task Events_JoinsGroup_ReturnsLinkDeadIndexes()
    {
        var kernel = new FakeNetlinkKernel();
        using var events = NbdNetlinkEvents.Subscribe(kernel);
        Assert.Equal([FakeNetlinkKernel.McastGroup], kernel.JoinedGroups);

        static byte[] LinkDead(uint index) =>
            new NetlinkMessageBuilder(FakeNetlinkKernel.NbdFamilyId, 0, 0).GenericHeader(NetlinkConstants.NBD_CMD_LINK_DEAD, 1)
                .AddUInt32(NetlinkConstants.NBD_ATTR_INDEX, index).ToArray();

        var wait = events.WaitForLinkDeadAsync(CancellationToken.None);
        Assert.False(wait.IsCompleted);
        kernel.Push(LinkDead(4).Concat(LinkDead(7)).ToArray());
        Assert.Equal(4, await wait.WaitAsync(TimeSpan.FromSeconds(5)));
        Assert.Equal(7, await events.WaitForLinkDeadAsync(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(5)));

        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(50));
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => events.WaitForLinkDeadAsync(cts.Token));
    }
}

using Nbd.Protocol.Tests.TestSupport;
using static Nbd.Protocol.Tests.Transmission.RelayTest;
using static Nbd.Protocol.Tests.TestSupport.RawTransmission;

namespace Nbd.Protocol.Tests.Transmission;

/// <summary>A healthy server: the relay carries requests and replies byte for byte and adds nothing.</summary>
public sealed class NbdRelayPassThroughTests
{
    [Fact(Timeout = 30_000)]
    public async Task Relay_WriteThenRead_SameBytesAndCookiesOnBothWires()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        await using var harness = RelayHarness.Start(server);
        byte[] data = Bytes(4096, seed: 1);

        byte[] write = [.. Request(CmdWrite, 0x0102030405060708, 8192, 4096, flags: 1), .. data];
        await harness.SendAsync(write, deadline.Token);
        byte[] writeReply = await ReceiveExactlyAsync(harness.Kernel, SimpleReplyLength, deadline.Token);
        Assert.Equal(SimpleReply(0, 0x0102030405060708), writeReply);

        byte[] read = Request(CmdRead, 0xfedcba9876543210, 8192, 4096);
        await harness.SendAsync(read, deadline.Token);
        byte[] readReply = await ReceiveExactlyAsync(harness.Kernel, SimpleReplyLength + 4096, deadline.Token);
        Assert.Equal([.. SimpleReply(0, 0xfedcba9876543210), .. data], readReply);

        ServerConnection connection = await server.ConnectionAsync(0, deadline.Token);
        Assert.Collection(
            connection.Requests,
            r =>
            {
                Assert.Equal(write[..RequestLength], r.Header);
                Assert.Equal(data, r.Data);
            },
            r => Assert.Equal(read, r.Header));
        Assert.Equal(data, server.Disk.AsSpan(8192, 4096).ToArray());
        Assert.Equal(0, harness.Relay.InFlight);
        Assert.Empty(harness.Events);
        Assert.Equal(0, harness.Relay.Reconnects);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_ManyPipelinedRequests_EachAnsweredOnceWithItsData()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        server.Fill(seed: 2);
        byte[] disk = server.Disk;
        await using var harness = RelayHarness.Start(server);

        // 100 writes to distinct 4 KiB blocks in the first half, 100 reads of the untouched second half, interleaved,
        // plus flushes and trims: all sent before the first reply is read.
        var expectedReads = new Dictionary<ulong, byte[]>();
        var cookies = new HashSet<ulong>();
        var stream = new List<byte>();
        var writes = new Dictionary<int, byte[]>();
        for (int i = 0; i < 100; i++)
        {
            ulong writeCookie = 0x1000 + (ulong)i;
            byte[] data = Bytes(4096, seed: 100 + i);
            writes[i] = data;
            stream.AddRange([.. Request(CmdWrite, writeCookie, (ulong)i * 4096, 4096), .. data]);
            ulong readCookie = 0x2000 + (ulong)i;
            int readOffset = (DiskSize / 2) + (i * 4096);
            stream.AddRange(Request(CmdRead, readCookie, (ulong)readOffset, 4096));
            expectedReads[readCookie] = disk.AsSpan(readOffset, 4096).ToArray();
            cookies.Add(writeCookie);
            cookies.Add(readCookie);
            if (i % 10 == 9)
            {
                ulong flushCookie = 0x3000 + (ulong)i;
                stream.AddRange(Request(CmdFlush, flushCookie, 0, 0));
                cookies.Add(flushCookie);
            }
        }

        Task<List<(RawReply, byte[])>> replies = ReceiveRepliesAsync(harness, cookies.Count, expectedReads, cookies, deadline.Token);
        await harness.SendAsync([.. stream], deadline.Token);
        await replies;

        byte[] after = server.Disk;
        foreach ((int i, byte[] data) in writes)
        {
            Assert.Equal(data, after.AsSpan(i * 4096, 4096).ToArray());
        }

        Assert.Equal(0, harness.Relay.InFlight);
        ServerConnection connection = await server.ConnectionAsync(0, deadline.Token);
        Assert.Equal(cookies.Order(), connection.Cookies.Order());
        Assert.Empty(harness.Events);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_ServerRepliesOutOfOrder_KernelGetsRepliesInServerOrderWithTheirData()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(ReorderBatch: 8));
        server.Fill(seed: 3);
        byte[] disk = server.Disk;
        await using var harness = RelayHarness.Start(server);

        var expectedReads = new Dictionary<ulong, byte[]>();
        var stream = new List<byte>();
        for (int i = 0; i < 8; i++)
        {
            // Different lengths: a reply matched to the wrong request would misalign the stream.
            int length = 512 * (i + 1);
            stream.AddRange(Request(CmdRead, 0x500 + (ulong)i, (ulong)i * 65536, (uint)length));
            expectedReads[0x500 + (ulong)i] = disk.AsSpan(i * 65536, length).ToArray();
        }

        await harness.SendAsync([.. stream], deadline.Token);
        var replies = await ReceiveRepliesAsync(harness, 8, expectedReads, expectedReads.Keys.ToHashSet(), deadline.Token);

        Assert.Equal([0x507, 0x506, 0x505, 0x504, 0x503, 0x502, 0x501, 0x500], replies.Select(r => r.Reply.Cookie));
        Assert.Empty(harness.Events);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_ServerSlowToReply_KernelWaitsAndNoReconnect()
    {
        // The relay has no timeout of its own: slowness is the kernel's to judge (its request timeout).
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(ReplyDelay: TimeSpan.FromMilliseconds(300)));
        server.Fill(seed: 5);
        await using var harness = RelayHarness.Start(server);
        var expectedReads = new Dictionary<ulong, byte[]> { [0x11] = server.Disk.AsSpan(0, 512).ToArray(), [0x12] = server.Disk.AsSpan(512, 512).ToArray() };

        await harness.SendAsync([.. Request(CmdRead, 0x11, 0, 512), .. Request(CmdRead, 0x12, 512, 512), .. Request(CmdFlush, 0x13, 0, 0)], deadline.Token);
        await ReceiveRepliesAsync(harness, 3, expectedReads, new HashSet<ulong> { 0x11, 0x12, 0x13 }, deadline.Token);

        Assert.Empty(harness.Events);
        Assert.Single(server.Connections);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_ServerErrorReplyToRead_PassedOnWithoutData()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        server.Fill(seed: 4);
        await using var harness = RelayHarness.Start(server);

        // Past the end: EINVAL and no data; the next reply must follow the 16-byte header directly.
        await harness.SendAsync([.. Request(CmdRead, 0xbad, DiskSize, 4096), .. Request(CmdRead, 0x600d, 0, 512)], deadline.Token);

        byte[] bytes = await ReceiveExactlyAsync(harness.Kernel, (2 * SimpleReplyLength) + 512, deadline.Token);
        Assert.Equal(SimpleReply(InMemoryNbdServer.Einval, 0xbad), bytes[..SimpleReplyLength]);
        Assert.Equal(SimpleReply(0, 0x600d), bytes[SimpleReplyLength..(2 * SimpleReplyLength)]);
        Assert.Equal(server.Disk.AsSpan(0, 512).ToArray(), bytes[(2 * SimpleReplyLength)..]);
        Assert.Equal(0, harness.Relay.InFlight);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_TrimLongerThanDataLimit_PassedOnAndAnswered()
    {
        // TRIM carries no data, so the 32 MiB bound on READ/WRITE does not apply to it.
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        await using var harness = RelayHarness.Start(server);

        byte[] trim = Request(CmdTrim, 0x7, 0, (32 * 1024 * 1024) + 4096);
        await harness.SendAsync(trim, deadline.Token);

        RawReply reply = ParseReply(await ReceiveExactlyAsync(harness.Kernel, SimpleReplyLength, deadline.Token));
        Assert.Equal(new RawReply(SimpleReplyMagic, InMemoryNbdServer.Einval, 0x7), reply);
        Assert.Equal(trim, Assert.Single((await server.ConnectionAsync(0, deadline.Token)).Requests).Header);
    }
}

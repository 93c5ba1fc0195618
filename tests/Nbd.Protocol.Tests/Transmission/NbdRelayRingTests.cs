using System.Net.Sockets;
using Nbd.Protocol.Tests.TestSupport;
using Nbd.Protocol.Transmission;
using static Nbd.Protocol.Tests.Transmission.RelayTest;
using static Nbd.Protocol.Tests.TestSupport.RawTransmission;

namespace Nbd.Protocol.Tests.Transmission;

/// <summary>
/// The relay keeps the kernel's requests in the ring they were received into (<see cref="RequestRing"/>) until they are
/// answered: requests that wrap around its end, a request larger than the ring, a full ring, and a send that still reads
/// a request's bytes when its reply comes.
/// </summary>
public sealed class NbdRelayRingTests
{
    [Fact(Timeout = 30_000)]
    public async Task Relay_RequestsWrapAroundASmallRing_CarriedByteForByte()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        server.Fill(seed: 40);
        byte[] disk = server.Disk;
        await using var harness = RelayHarness.Start(server, requestBufferBytes: 4096);

        // Writes of 1000..2900 bytes (never a divisor of the ring) between reads and flushes, all sent before the first
        // reply is read: the ring fills, wraps inside headers and inside data, and is freed by the replies.
        var stream = new List<byte>();
        var sent = new List<byte[]>();
        var writes = new Dictionary<int, byte[]>();
        var expectedReads = new Dictionary<ulong, byte[]>();
        var cookies = new HashSet<ulong>();
        for (int i = 0; i < 60; i++)
        {
            byte[] data = Bytes(1000 + (i * 37 % 1900), seed: 400 + i);
            writes[i * 4096] = data;
            byte[] write = [.. Request(CmdWrite, 0x4000 + (ulong)i, (ulong)i * 4096, (uint)data.Length), .. data];
            byte[] read = Request(CmdRead, 0x5000 + (ulong)i, (ulong)(DiskSize / 2) + ((ulong)i * 4096), 700);
            expectedReads[0x5000 + (ulong)i] = disk.AsSpan((DiskSize / 2) + (i * 4096), 700).ToArray();
            sent.Add(write);
            sent.Add(read);
            stream.AddRange([.. write, .. read]);
            cookies.UnionWith([0x4000 + (ulong)i, 0x5000 + (ulong)i]);
            if (i % 7 == 6)
            {
                byte[] flush = Request(CmdFlush, 0x6000 + (ulong)i, 0, 0);
                sent.Add(flush);
                stream.AddRange(flush);
                cookies.Add(0x6000 + (ulong)i);
            }
        }

        Assert.True(stream.Count > 20 * 4096, "the stream must go round the ring many times");
        Task<List<(RawReply, byte[])>> replies = ReceiveRepliesAsync(harness, cookies.Count, expectedReads, cookies, deadline.Token);
        await harness.SendAsync([.. stream], deadline.Token);
        await replies;

        ServerConnection connection = await server.ConnectionAsync(0, deadline.Token);
        Assert.Equal(sent.Count, connection.Requests.Count);
        for (int i = 0; i < sent.Count; i++)
        {
            ReceivedRequest got = connection.Requests[i];
            Assert.Equal(sent[i], (byte[])[.. got.Header, .. got.Data ?? []]);
        }

        byte[] after = server.Disk;
        foreach ((int offset, byte[] data) in writes)
        {
            Assert.Equal(data, after.AsSpan(offset, data.Length).ToArray());
        }

        Assert.Equal(0, harness.Relay.InFlight);
        Assert.Empty(harness.Events);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_RequestLargerThanTheRing_CarriedWholeBetweenSmallOnes()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        await using var harness = RelayHarness.Start(server, requestBufferBytes: 4096);

        // Small writes before and after a 64 KiB one, back to back: the large one arrives while the ring holds the
        // first ones unanswered and part of it, and must come out whole, followed by the rest intact.
        var stream = new List<byte>();
        var sent = new List<byte[]>();
        var cookies = new HashSet<ulong>();
        int[] lengths = [1500, 1500, 1500, 65536, 1500, 3000, 1500];
        int offset = 0;
        for (int i = 0; i < lengths.Length; i++)
        {
            byte[] write = [.. Request(CmdWrite, 0x7000 + (ulong)i, (ulong)offset, (uint)lengths[i]), .. Bytes(lengths[i], seed: 700 + i)];
            sent.Add(write);
            stream.AddRange(write);
            cookies.Add(0x7000 + (ulong)i);
            offset += lengths[i];
        }

        Task<List<(RawReply, byte[])>> replies = ReceiveRepliesAsync(harness, cookies.Count, new Dictionary<ulong, byte[]>(), cookies, deadline.Token);
        await harness.SendAsync([.. stream], deadline.Token);
        await replies;

        ServerConnection connection = await server.ConnectionAsync(0, deadline.Token);
        Assert.Equal(sent.Count, connection.Requests.Count);
        for (int i = 0; i < sent.Count; i++)
        {
            Assert.Equal(sent[i], (byte[])[.. connection.Requests[i].Header, .. connection.Requests[i].Data ?? []]);
        }

        Assert.Equal(0, harness.Relay.InFlight);
        Assert.Empty(harness.Events);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_RingFullOfUnansweredRequests_ReadsNoFurtherRequest()
    {
        using var deadline = Deadline();

        // The server holds its replies until it has three: with room for two requests in the ring, it never gets a
        // third (the relay does not read it from the kernel's end), so nothing is answered.
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(ReorderBatch: 3));
        await using var harness = RelayHarness.Start(server, requestBufferBytes: 8192);
        ServerConnection connection = await FillTheRingAsync(harness, server, 0x8000, deadline.Token);
        await Task.Delay(500, deadline.Token);

        Assert.Equal([0x8000ul, 0x8001ul], connection.Cookies);
        Assert.Equal(2, harness.Relay.InFlight);
        Assert.Equal(0, harness.Kernel.Available);
        Assert.False(harness.Relay.Completion.IsCompleted);
    }

    [Theory(Timeout = 30_000)]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Relay_RingFullAndTheKernelHangsUp_EndsKernelClosedAtOnce(bool serverGone)
    {
        using var deadline = Deadline();

        // The server answers nothing (it holds replies until it has three), or it died after two requests and every
        // reconnect fails: either way the ring stays full, and the relay reads nothing more from the kernel's end.
        ConnectionScript script = serverGone
            ? new ConnectionScript(AnswerFirst: 0, FaultAt: 2, Fault: ServerFault.CloseWithoutReply)
            : new ConnectionScript(ReorderBatch: 3);
        await using var server = new InMemoryNbdServer(DiskSize, _ => script);
        await using var harness = RelayHarness.Start(
            server,
            reconnect: (_, _) => Task.FromException<Socket>(new SocketException((int)SocketError.ConnectionRefused)),
            giveUpAfter: TimeSpan.FromMinutes(5),
            requestBufferBytes: 8192);
        await FillTheRingAsync(harness, server, 0xA000, deadline.Token);

        // What a disconnect does to the driver's end (netlink: at once; ioctl: at NBD_CLEAR_SOCK).
        harness.Kernel.Shutdown(SocketShutdown.Both);
        using var soon = CancellationTokenSource.CreateLinkedTokenSource(deadline.Token);
        soon.CancelAfter(TimeSpan.FromSeconds(3));
        NbdRelayEnd end = await harness.CompletionAsync(soon.Token);

        Assert.Equal(NbdRelayEndReason.KernelClosed, end.Reason);
        Assert.Contains("the kernel closed its end", end.Detail, StringComparison.Ordinal);
    }

    /// <summary>
    /// Four writes of 3000 bytes (cookies from <paramref name="cookie"/>) into an 8 KiB ring whose server answers none:
    /// the relay takes two and the start of the third, then reads nothing more. Returns the server's connection once
    /// the two arrived there.
    /// </summary>
    private static async Task<ServerConnection> FillTheRingAsync(RelayHarness harness, InMemoryNbdServer server, ulong cookie, CancellationToken ct)
    {
        var stream = new List<byte>();
        for (int i = 0; i < 4; i++)
        {
            stream.AddRange([.. Request(CmdWrite, cookie + (ulong)i, (ulong)i * 4096, 3000), .. Bytes(3000, seed: (int)(cookie & 0xffff) + i)]);
        }

        await harness.SendAsync([.. stream], ct);
        ServerConnection connection = await server.ConnectionAsync(0, ct);
        await Wait.UntilAsync(() => connection.Requests.Count == 2, "two requests at the server", ct);
        return connection;
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_WriteAnsweredWhileItsResendStillRuns_ItsBytesNotReusedForTheNextRequest()
    {
        using var deadline = Deadline();

        // The kernel's end and two server connections the test plays by hand.
        (Socket relayEnd, Socket kernel) = RelayHarness.UnixPair();
        (Socket firstRelaySide, Socket first) = RelayHarness.UnixPair();
        (Socket secondRelaySide, Socket second) = RelayHarness.UnixPair();
        using var kernelOwned = kernel;
        using var firstOwned = first;
        using var secondOwned = second;

        // The second connection takes a few KiB at a time: the resend of the first write blocks in send(2) until the
        // test reads it, long after the test answered it.
        secondRelaySide.SendBufferSize = 4096;
        second.ReceiveBufferSize = 4096;
        using var relay = new NbdRelay(relayEnd, firstRelaySide, new NbdRelayOptions
        {
            Reconnect = _ => Task.FromResult(secondRelaySide),
            RetryInterval = TimeSpan.FromMilliseconds(10),
            Name = "ring-test",
            RequestBufferBytes = 65536,
        });
        relay.Start();

        byte[] firstData = Bytes(60000, seed: 900);
        byte[] firstWrite = [.. Request(CmdWrite, 0x9001, 0, (uint)firstData.Length), .. firstData];
        await SendAsync(kernel, firstWrite, deadline.Token);

        // The first server reads the whole request and dies without a reply: the relay resends it on the second.
        byte[] onFirst = await ReceiveExactlyAsync(first, firstWrite.Length, deadline.Token);
        Assert.Equal(firstWrite, onFirst);
        first.Dispose();

        // The second server reads only the header and answers at once (it misbehaves: the data is still coming).
        byte[] header = await ReceiveExactlyAsync(second, RequestLength, deadline.Token);
        Assert.Equal(firstWrite[..RequestLength], header);
        await SendAsync(second, SimpleReply(0, 0x9001), deadline.Token);
        byte[] reply = await ReceiveExactlyAsync(kernel, SimpleReplyLength, deadline.Token);
        Assert.Equal(SimpleReply(0, 0x9001), reply);

        // The kernel's next write needs the ring's room: the first one's bytes, if they were free already.
        byte[] nextData = Bytes(60000, seed: 901);
        byte[] nextWrite = [.. Request(CmdWrite, 0x9002, 65536, (uint)nextData.Length), .. nextData];
        await SendAsync(kernel, nextWrite, deadline.Token);
        await Task.Delay(300, deadline.Token);

        // Now the rest of the first write, as the resend sends it: its own bytes, then the next request whole.
        byte[] restOfFirst = await ReceiveExactlyAsync(second, firstData.Length, deadline.Token);
        Assert.True(firstData.AsSpan().SequenceEqual(restOfFirst), "the resent write carried bytes that are not its own");
        byte[] next = await ReceiveExactlyAsync(second, nextWrite.Length, deadline.Token);
        Assert.Equal(nextWrite, next);
        await SendAsync(second, SimpleReply(0, 0x9002), deadline.Token);
        Assert.Equal(SimpleReply(0, 0x9002), await ReceiveExactlyAsync(kernel, SimpleReplyLength, deadline.Token));
        Assert.Equal(0, relay.InFlight);
    }
}

using Nbd.Protocol.Tests.TestSupport;
using Nbd.Protocol.Transmission;
using static Nbd.Protocol.Tests.Transmission.RelayTest;
using static Nbd.Protocol.Tests.TestSupport.RawTransmission;

namespace Nbd.Protocol.Tests.Transmission;

/// <summary>
/// The server connection fails in each way the relay must hide from the kernel: the relay reconnects, resends what was
/// unanswered in the kernel's order, and the kernel gets exactly one complete reply per request.
/// </summary>
public sealed class NbdRelayServerFaultTests
{
    [Theory(Timeout = 30_000)]
    [InlineData(nameof(ServerFault.CloseWithoutReply), true)]
    [InlineData(nameof(ServerFault.CloseWithoutReply), false)]
    [InlineData(nameof(ServerFault.CutInsideReply), true)]
    [InlineData(nameof(ServerFault.CutInsideReply), false)]
    [InlineData(nameof(ServerFault.BadMagic), true)]
    [InlineData(nameof(ServerFault.StructuredMagic), true)]
    [InlineData(nameof(ServerFault.UnknownCookie), true)]
    [InlineData(nameof(ServerFault.UnknownCookie), false)]
    public async Task Relay_ServerFaultWithRequestsInFlight_ResendsUnansweredInKernelOrderAndAnswersEachOnce(string faultName, bool faultOnRead)
    {
        var fault = Enum.Parse<ServerFault>(faultName);
        using var deadline = Deadline();

        // Connection 0 answers request 1, holds 2 and 3, and fails at 4 (a read: inside its data; a flush: inside
        // the header); connection 1 is healthy.
        await using var server = new InMemoryNbdServer(DiskSize, i => i == 0 ? new ConnectionScript(AnswerFirst: 1, FaultAt: 4, Fault: fault) : ConnectionScript.Normal);
        server.Fill(seed: 10);
        byte[] disk = server.Disk;
        await using var harness = RelayHarness.Start(server);

        byte[] small = Bytes(4096, seed: 11);
        byte[] large = Bytes(128 * 1024, seed: 12);
        byte[][] requests =
        [
            [.. Request(CmdWrite, 0xA1, 0, 4096), .. small],
            Request(CmdRead, 0xA2, 65536, 8192),
            [.. Request(CmdWrite, 0xA3, 262144, (uint)large.Length, flags: 1), .. large],
            faultOnRead ? Request(CmdRead, 0xA4, 524288, 16384) : Request(CmdFlush, 0xA4, 0, 0),
        ];
        var expectedReads = new Dictionary<ulong, byte[]> { [0xA2] = disk.AsSpan(65536, 8192).ToArray() };
        if (faultOnRead)
        {
            expectedReads[0xA4] = disk.AsSpan(524288, 16384).ToArray();
        }

        Task<List<(RawReply, byte[])>> replies = ReceiveRepliesAsync(harness, 4, expectedReads, new HashSet<ulong> { 0xA1, 0xA2, 0xA3, 0xA4 }, deadline.Token);
        await harness.SendAsync([.. requests.SelectMany(r => r)], deadline.Token);
        await replies;

        ServerConnection first = await server.ConnectionAsync(0, deadline.Token);
        ServerConnection second = await server.ConnectionAsync(1, deadline.Token);
        Assert.Equal([0xA1UL, 0xA2, 0xA3, 0xA4], first.Cookies);
        Assert.Collection(
            second.Requests,
            r => Assert.Equal(requests[1], r.Header),
            r =>
            {
                Assert.Equal(requests[2][..RequestLength], r.Header);
                Assert.Equal(large, r.Data);
            },
            r => Assert.Equal(requests[3], r.Header));
        AssertOneReconnect(harness, inFlight: 3, resent: 3);
        Assert.Equal(0, harness.Relay.InFlight);

        byte[] after = server.Disk;
        Assert.Equal(small, after.AsSpan(0, 4096).ToArray());
        Assert.Equal(large, after.AsSpan(262144, large.Length).ToArray());

        // The new connection carries on: a read through it sees the resent write.
        byte[] back = await ReadAsync(harness.Kernel, 262144, (uint)large.Length, 0xA5, deadline.Token);
        Assert.Equal(large, back);
        Assert.False(harness.Relay.Completion.IsCompleted);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_ServerDropsIdleConnection_ReconnectsWithNothingToResend()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, i => i == 0 ? new ConnectionScript(HangUpAtOnce: true) : ConnectionScript.Normal);
        server.Fill(seed: 13);
        await using var harness = RelayHarness.Start(server);
        await harness.WaitForEventsAsync(e => e.OfType<NbdRelayReconnected>().Any(), "the reconnect", deadline.Token);

        byte[] data = await ReadAsync(harness.Kernel, 1024, 512, 0xF1, deadline.Token);

        Assert.Equal(server.Disk.AsSpan(1024, 512).ToArray(), data);
        AssertOneReconnect(harness, inFlight: 0, resent: 0);
        Assert.Equal([0xF1UL], server.Connections[1].Cookies);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_ServerClosesWithWritesInFlight_WriteDataResentIntactAndApplied()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(8 * DiskSize, i => i == 0 ? new ConnectionScript(AnswerFirst: 0, FaultAt: 5, Fault: ServerFault.CloseWithoutReply) : ConnectionScript.Normal);
        await using var harness = RelayHarness.Start(server);

        // Sizes around the relay's 64 KiB join-or-not boundary, and a megabyte.
        int[] sizes = [512, 65536, 65536 + 512, 1 << 20, 4096];
        var writes = sizes.Select((size, i) => (Cookie: 0xC0UL + (ulong)i, Offset: i * (1 << 20), Data: Bytes(size, seed: 20 + i))).ToArray();
        var stream = writes.SelectMany(w => (byte[])[.. Request(CmdWrite, w.Cookie, (ulong)w.Offset, (uint)w.Data.Length), .. w.Data]).ToArray();

        Task<List<(RawReply, byte[])>> replies = ReceiveRepliesAsync(harness, writes.Length, new Dictionary<ulong, byte[]>(), writes.Select(w => w.Cookie).ToHashSet(), deadline.Token);
        await harness.SendAsync(stream, deadline.Token);
        await replies;

        ServerConnection second = await server.ConnectionAsync(1, deadline.Token);
        Assert.Equal(writes.Select(w => w.Cookie), second.Cookies);
        for (int i = 0; i < writes.Length; i++)
        {
            Assert.True(writes[i].Data.AsSpan().SequenceEqual(second.Requests[i].Data), $"Resent write #{i} carries other bytes.");
        }

        byte[] disk = server.Disk;
        Assert.All(writes, w => Assert.True(w.Data.AsSpan().SequenceEqual(disk.AsSpan(w.Offset, w.Data.Length)), $"Write 0x{w.Cookie:x} is not on the disk."));
        AssertOneReconnect(harness, inFlight: writes.Length, resent: writes.Length);
    }

    [Fact(Timeout = 60_000)]
    public async Task Relay_ResendOfLargeReadsAheadOfWrites_KeepsForwardingRepliesWhileResending()
    {
        // The resend puts 16 MiB of read requests ahead of 4 MiB of write data on the new connection. A server that
        // answers in order stops reading requests while its replies are not being read: if the relay sends the whole
        // backlog before it reads a reply, neither side moves again. The first server answers nothing until it dies at
        // the 20th request: the ring must hold all 20 (the relay reads no request beyond what it can hold unanswered).
        using var deadline = Deadline(45);
        const int Mib = 1 << 20;
        await using var server = new InMemoryNbdServer(32 * Mib, i => i == 0 ? new ConnectionScript(AnswerFirst: 0, FaultAt: 20, Fault: ServerFault.CloseWithoutReply) : ConnectionScript.Normal);
        server.Fill(seed: 30);
        byte[] disk = server.Disk;
        await using var harness = RelayHarness.Start(server, requestBufferBytes: 8 * Mib);

        var expectedReads = new Dictionary<ulong, byte[]>();
        var cookies = new HashSet<ulong>();
        var stream = new List<byte>();
        for (int i = 0; i < 16; i++)
        {
            stream.AddRange(Request(CmdRead, 0xD000 + (ulong)i, (ulong)i * Mib, Mib));
            expectedReads[0xD000 + (ulong)i] = disk.AsSpan(i * Mib, Mib).ToArray();
            cookies.Add(0xD000 + (ulong)i);
        }

        for (int i = 0; i < 4; i++)
        {
            stream.AddRange([.. Request(CmdWrite, 0xE000 + (ulong)i, (ulong)(16 + i) * Mib, Mib), .. Bytes(Mib, seed: 40 + i)]);
            cookies.Add(0xE000 + (ulong)i);
        }

        Task<List<(RawReply, byte[])>> replies = ReceiveRepliesAsync(harness, cookies.Count, expectedReads, cookies, deadline.Token);
        await harness.SendAsync([.. stream], deadline.Token);
        await replies;

        AssertOneReconnect(harness, inFlight: 20, resent: 20);
    }
}

using Microsoft.Extensions.Time.Testing;
using System.Net.Sockets;
using Nbd.Protocol.Tests.TestSupport;
using Nbd.Protocol.Transmission;
using static Nbd.Protocol.Tests.Transmission.RelayTest;
using static Nbd.Protocol.Tests.TestSupport.RawTransmission;

namespace Nbd.Protocol.Tests.Transmission;

/// <summary>What the kernel's end does to the relay: close it, disconnect, or send what no driver sends.</summary>
public sealed class NbdRelayKernelSideTests
{
    [Theory(Timeout = 30_000)]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Relay_KernelClosesItsEnd_EndsKernelClosedAndClosesServerConnection(bool requestInFlight)
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(AnswerFirst: 1));
        await using var harness = RelayHarness.Start(server);
        await WriteAsync(harness.Kernel, 0, Bytes(512, seed: 90), 0x91, deadline.Token);
        if (requestInFlight)
        {
            await harness.SendRequestAsync(CmdRead, 0x92, 0, 512, deadline.Token);
            await Wait.UntilAsync(() => harness.Server.Connections[0].Requests.Count == 2, "the held read at the server", deadline.Token);
        }

        harness.Kernel.Shutdown(SocketShutdown.Both);

        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);
        Assert.Equal(NbdRelayEndReason.KernelClosed, end.Reason);
        ServerConnection connection = await server.ConnectionAsync(0, deadline.Token);
        await connection.Ended.WaitAsync(deadline.Token);
        Assert.Single(server.Connections);
        Assert.Empty(harness.Events);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_KernelSendsDisc_PassedOnByteExactAndRelayEndsDisconnected()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        await using var harness = RelayHarness.Start(server);
        await WriteAsync(harness.Kernel, 0, Bytes(512, seed: 95), 0x96, deadline.Token);

        byte[] disc = Request(CmdDisc, 0x0123456789abcdef, 0, 0);
        await harness.SendAsync(disc, deadline.Token);

        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);
        Assert.Equal(NbdRelayEndReason.Disconnected, end.Reason);
        ServerConnection connection = await server.ConnectionAsync(0, deadline.Token);
        await connection.Ended.WaitAsync(deadline.Token);
        Assert.Equal(disc, connection.Requests[^1].Header);
        Assert.Equal(2, connection.Requests.Count);
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
        Assert.Single(server.Connections);
    }

    /// <summary>
    /// The spec has the server answer outstanding requests before it closes, and the driver reads replies after DISC.
    /// With GiveUpAfter zero (no reconnect) the relay used to end as DISC went out, and the reply never came back.
    /// </summary>
    [Theory(Timeout = 30_000)]
    [InlineData(10)]
    [InlineData(0)]
    public async Task Relay_KernelSendsDiscWithReadInFlight_ReplyGoesBackFirstThenEndOfStream(int giveUpAfterSeconds)
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(ReplyDelay: TimeSpan.FromMilliseconds(300)));
        server.Fill(seed: 97);
        await using var harness = RelayHarness.Start(server, giveUpAfter: TimeSpan.FromSeconds(giveUpAfterSeconds));
        byte[] expected = server.Disk.AsSpan(4096, 1024).ToArray();

        await harness.SendRequestAsync(CmdRead, 0x98, 4096, 1024, deadline.Token);
        await harness.SendAsync(Request(CmdDisc, 0x99, 0, 0), deadline.Token);

        var (reply, data) = await harness.ReceiveReplyAsync(_ => 1024, deadline.Token);
        Assert.Equal(0x98ul, reply.Cookie);
        Assert.Equal(0u, reply.Error);
        Assert.Equal(expected, data);
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);
        Assert.Equal(NbdRelayEndReason.Disconnected, end.Reason);
        Assert.Equal("the kernel sent NBD_CMD_DISC", end.Detail);
        Assert.Equal([0x98ul, 0x99ul], (await server.ConnectionAsync(0, deadline.Token)).Cookies);
        Assert.Equal(0, harness.ReconnectCalls);
        Assert.Empty(harness.Events);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_KernelSendsDiscAndServerClosesWithoutAnswering_EndsDisconnectedWithoutReconnecting()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(AnswerFirst: 1));
        await using var harness = RelayHarness.Start(server);
        await WriteAsync(harness.Kernel, 0, Bytes(512, seed: 101), 0x102, deadline.Token);
        await harness.SendRequestAsync(CmdRead, 0x103, 0, 512, deadline.Token);
        await Wait.UntilAsync(() => server.Connections[0].Requests.Count == 2, "the held read at the server", deadline.Token);

        await harness.SendAsync(Request(CmdDisc, 0x104, 0, 0), deadline.Token);

        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);
        Assert.Equal(NbdRelayEndReason.Disconnected, end.Reason);
        Assert.Contains("1 requests in flight then got no reply", end.Detail, StringComparison.Ordinal);
        Assert.Equal(0, harness.ReconnectCalls);
        Assert.Empty(harness.Events);
        Assert.Single(server.Connections);
    }

    /// <summary>
    /// A server that neither answers nor closes after DISC: bounded by GiveUpAfter, or with GiveUpAfter zero (no reconnect)
    /// by a wait of its own (it was zero too, and the relay ended as DISC went out).
    /// </summary>
    [Theory(Timeout = 30_000)]
    [InlineData(10)]
    [InlineData(0)]
    public async Task Relay_KernelSendsDiscAndServerNeitherAnswersNorCloses_EndsAfterItsWaitOnItsClock(int giveUpAfterSeconds)
    {
        using var deadline = Deadline();
        var clock = new FakeTimeProvider();
        TimeSpan wait = giveUpAfterSeconds == 0 ? NbdRelay.DisconnectWaitWithoutReconnect : TimeSpan.FromSeconds(giveUpAfterSeconds);
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(AnswerFirst: 1, KeepOpenAfterDisc: true));
        await using var harness = RelayHarness.Start(server, giveUpAfter: TimeSpan.FromSeconds(giveUpAfterSeconds), timeProvider: clock);
        await WriteAsync(harness.Kernel, 0, Bytes(512, seed: 109), 0x10a, deadline.Token);
        await harness.SendRequestAsync(CmdRead, 0x10b, 0, 512, deadline.Token);
        await harness.SendAsync(Request(CmdDisc, 0x10c, 0, 0), deadline.Token);
        await Wait.UntilAsync(() => server.Connections[0].Requests.Count == 3, "DISC at the server", deadline.Token);

        clock.Advance(wait - TimeSpan.FromSeconds(0.1));
        await Task.Delay(200, deadline.Token);
        Assert.False(harness.Relay.Completion.IsCompleted, "The relay ended before its wait for the replies owed.");

        clock.Advance(TimeSpan.FromSeconds(0.1));
        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);
        Assert.Equal(NbdRelayEndReason.Disconnected, end.Reason);
        Assert.Contains("1 requests in flight then got no reply", end.Detail, StringComparison.Ordinal);
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
        Assert.Equal(0, harness.ReconnectCalls);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_KernelSendsDiscDuringAnOutage_EndsAtOnceWithoutResending()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, i => i == 0 ? new ConnectionScript(FaultAt: 2, Fault: ServerFault.CloseWithoutReply) : ConnectionScript.Normal);
        await using var harness = RelayHarness.Start(
            server,
            reconnect: async (_, ct) =>
            {
                await Task.Delay(Timeout.Infinite, ct);
                throw new IOException("unreachable");
            },
            giveUpAfter: TimeSpan.FromMinutes(5));
        await WriteAsync(harness.Kernel, 0, Bytes(512, seed: 105), 0x106, deadline.Token);
        await harness.SendRequestAsync(CmdRead, 0x107, 0, 512, deadline.Token);
        await Wait.UntilAsync(() => harness.ReconnectCalls == 1, "the reconnect attempt", deadline.Token);

        await harness.SendAsync(Request(CmdDisc, 0x108, 0, 0), deadline.Token);

        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);
        Assert.Equal(NbdRelayEndReason.Disconnected, end.Reason);
        Assert.Contains("1 requests in flight then got no reply", end.Detail, StringComparison.Ordinal);
        Assert.Single(server.Connections);
        Assert.Equal(1, harness.ReconnectCalls);
    }

    public static TheoryData<string, byte[]> MalformedRequests => new()
    {
        { "wrong magic", Request(CmdRead, 0x1, 0, 512, magic: 0x25609514) },
        { "reply magic", Request(CmdRead, 0x1, 0, 512, magic: SimpleReplyMagic) },
        { "BLOCK_STATUS (needs structured replies)", Request(7, 0x1, 0, 512) },
        { "RESIZE", Request(8, 0x1, 0, 0) },
        { "unknown type 9", Request(9, 0x1, 0, 0) },
        { "unknown type 0xffff", Request(0xffff, 0x1, 0, 0) },
        { "read of 32 MiB + 1", Request(CmdRead, 0x1, 0, (32 << 20) + 1) },
        { "read of 4 GiB - 1", Request(CmdRead, 0x1, 0, uint.MaxValue) },
        { "write of 32 MiB + 1", Request(CmdWrite, 0x1, 0, (32 << 20) + 1) },
    };

    [Theory(Timeout = 30_000)]
    [MemberData(nameof(MalformedRequests))]
    public async Task Relay_KernelSendsMalformedRequest_EndsKernelProtocolErrorAndPassesNothingOn(string what, byte[] request)
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        await using var harness = RelayHarness.Start(server);
        byte[] good = await ReadAsync(harness.Kernel, 0, 512, 0x1, deadline.Token);
        Assert.Equal(512, good.Length);

        await harness.SendAsync(request, deadline.Token);

        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);
        Assert.True(end.Reason == NbdRelayEndReason.KernelProtocolError, $"{what}: ended {end.Reason} ({end.Detail}).");
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
        ServerConnection connection = await server.ConnectionAsync(0, deadline.Token);
        await connection.Ended.WaitAsync(deadline.Token);
        Assert.Single(connection.Requests);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_KernelReusesCookieInFlight_EndsKernelProtocolError()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(AnswerFirst: 0));
        await using var harness = RelayHarness.Start(server);

        await harness.SendRequestAsync(CmdRead, 0x42, 0, 512, deadline.Token);
        await harness.SendRequestAsync(CmdWrite, 0x42, 4096, 512, deadline.Token, Bytes(512, seed: 1));

        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);
        Assert.Equal(NbdRelayEndReason.KernelProtocolError, end.Reason);
        Assert.Contains("0x0000000000000042", end.Detail, StringComparison.Ordinal);
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
        ServerConnection connection = await server.ConnectionAsync(0, deadline.Token);
        await connection.Ended.WaitAsync(deadline.Token);
        Assert.Equal([0x42UL], connection.Cookies);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_KernelReusesCookieAfterItsReply_Accepted()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        await using var harness = RelayHarness.Start(server);
        byte[] data = Bytes(512, seed: 2);

        await WriteAsync(harness.Kernel, 0, data, 0x42, deadline.Token);
        Assert.Equal(data, await ReadAsync(harness.Kernel, 0, 512, 0x42, deadline.Token));

        Assert.False(harness.Relay.Completion.IsCompleted);
    }
}

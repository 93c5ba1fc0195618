using System.Net.Sockets;
using Nbd.Protocol.Tests.TestSupport;
using Nbd.Protocol.Transmission;
using static Nbd.Protocol.Tests.Transmission.RelayTest;
using static Nbd.Protocol.Tests.TestSupport.RawTransmission;
using static TestSupport.Descriptors;

namespace Nbd.Protocol.Tests.Transmission;

/// <summary>
/// <see cref="NbdRelay.TryHandOver"/>: the relay stops between two requests with every reply delivered, gives its end
/// away without shutting the kernel's connection, and a relay created over a duplicate of that end (what the next
/// process receives from systemd's file descriptor store) carries on with the kernel's stream where the first stopped.
/// </summary>
public sealed class NbdRelayHandOverTests
{
    private static readonly TimeSpan Limit = TimeSpan.FromSeconds(10);

    [Fact(Timeout = 30_000)]
    public async Task HandOver_Idle_EndsHandedOverAndTheNextRelayServesTheKernelsNextRequests()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        await using var harness = RelayHarness.Start(server);
        byte[] written = Bytes(4096, seed: 201);
        await WriteAsync(harness.Kernel, 8192, written, 0x201, deadline.Token);

        Socket? kept = null;
        Assert.True(harness.Relay.TryHandOver(Limit, s => kept = Duplicate(s)));

        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);
        Assert.Equal(NbdRelayEndReason.HandedOver, end.Reason);
        await (await server.ConnectionAsync(0, deadline.Token)).Ended.WaitAsync(deadline.Token);
        harness.Relay.Dispose();

        // The kernel goes on sending while no relay reads: the request waits in the socket.
        await harness.SendRequestAsync(CmdRead, 0x202, 8192, 4096, deadline.Token);
        using NbdRelay next = StartOn(kept!, server);
        var (reply, data) = await harness.ReceiveReplyAsync(_ => 4096, deadline.Token);
        Assert.Equal(0x202ul, reply.Cookie);
        Assert.Equal(0u, reply.Error);
        Assert.Equal(written, data);
        Assert.Equal([0x202ul], (await server.ConnectionAsync(1, deadline.Token)).Cookies);
    }

    [Fact(Timeout = 30_000)]
    public async Task HandOver_RelayEndedByAnotherThreadWhileTheEndIsPassedOn_TheStoredEndStaysAlive()
    {
        // The give-up clock or a failure ending the relay between "kept" and "handed over" shut our end down, and
        // shutdown(2) acts on the socket: the copy just stored was dead too, and TryHandOver still said true.
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        server.Fill(seed: 207);
        await using var harness = RelayHarness.Start(server);
        Socket? kept = null;

        Assert.True(harness.Relay.TryHandOver(Limit, s =>
        {
            kept = Duplicate(s);
            harness.Relay.Dispose(); // ends it from here, as the server thread's give-up would
        }));

        await harness.SendRequestAsync(CmdRead, 0x207, 4096, 512, deadline.Token);
        using NbdRelay next = StartOn(kept!, server);
        var (reply, data) = await harness.ReceiveReplyAsync(_ => 512, deadline.Token);
        Assert.Equal(0x207ul, reply.Cookie);
        Assert.Equal(server.Disk.AsSpan(4096, 512).ToArray(), data);
    }

    [Fact(Timeout = 30_000)]
    public async Task HandOver_ReadInFlight_WaitsForItsReplyAndDeliversItBeforeHandingOver()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(ReplyDelay: TimeSpan.FromMilliseconds(400)));
        server.Fill(seed: 203);
        byte[] expected = server.Disk.AsSpan(0, 2048).ToArray();
        await using var harness = RelayHarness.Start(server);
        await harness.SendRequestAsync(CmdRead, 0x204, 0, 2048, deadline.Token);
        await Wait.UntilAsync(() => server.Connections is [{ Requests.Count: 1 }], "the read at the server", deadline.Token);

        Socket? kept = null;
        Assert.True(harness.Relay.TryHandOver(Limit, s => kept = Duplicate(s)));

        // The reply went back before the hand-over completed: it is already in the kernel's socket.
        Assert.True(harness.Kernel.Available >= SimpleReplyLength + 2048, $"only {harness.Kernel.Available} bytes waiting for the kernel");
        var (reply, data) = await harness.ReceiveReplyAsync(_ => 2048, deadline.Token);
        Assert.Equal(0x204ul, reply.Cookie);
        Assert.Equal(expected, data);
        Assert.Equal(NbdRelayEndReason.HandedOver, (await harness.CompletionAsync(deadline.Token)).Reason);
        kept!.Dispose();
    }

    [Fact(Timeout = 30_000)]
    public async Task HandOver_KernelInsideAWrite_FinishesThatRequestAndTheNextRelayStartsAtTheFollowingOne()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        await using var harness = RelayHarness.Start(server);
        byte[] first = Bytes(8192, seed: 205);
        byte[] message = [.. Request(CmdWrite, 0x205, 0, (uint)first.Length), .. first];

        // Header and half the data: the relay is inside the request when the hand-over starts.
        await harness.SendAsync(message[..(RequestLength + 4096)], deadline.Token);
        await Task.Delay(100, deadline.Token);
        Socket? kept = null;
        Task<bool> handOver = Task.Run(() => harness.Relay.TryHandOver(Limit, s => kept = Duplicate(s)), deadline.Token);
        await Task.Delay(300, deadline.Token);
        Assert.False(handOver.IsCompleted, "Handed over in the middle of a request.");
        await harness.SendAsync(message[(RequestLength + 4096)..], deadline.Token);

        Assert.True(await handOver.WaitAsync(deadline.Token));
        var (reply, _) = await harness.ReceiveReplyAsync(_ => 0, deadline.Token);
        Assert.Equal(0x205ul, reply.Cookie);
        Assert.Equal(first, server.Disk.AsSpan(0, first.Length).ToArray());
        harness.Relay.Dispose();

        byte[] second = Bytes(512, seed: 206);
        await harness.SendAsync([.. Request(CmdWrite, 0x206, 65536, 512), .. second], deadline.Token);
        using NbdRelay next = StartOn(kept!, server);
        var (secondReply, _) = await harness.ReceiveReplyAsync(_ => 0, deadline.Token);
        Assert.Equal(0x206ul, secondReply.Cookie);
        Assert.Equal(0u, secondReply.Error);
        Assert.Equal(second, server.Disk.AsSpan(65536, 512).ToArray());
    }

    [Fact(Timeout = 30_000)]
    public async Task HandOver_RequestWaitingUnreadInTheSocket_CarriedAndAnsweredBeforeHandingOver()
    {
        // The relay's kernel thread is stuck sending a large write to a server that does not read, and the kernel queues
        // a read behind it. That read was sent before the hand-over was asked for (with the deadline it had then): it
        // must be carried and answered, not left in the socket for the next process.
        using var deadline = Deadline();
        (Socket relayEnd, Socket kernel) = RelayHarness.UnixPair();
        (Socket relayServer, Socket server) = RelayHarness.UnixPair();
        using Socket kernelSide = kernel;
        using Socket serverSide = server;
        using var relay = new NbdRelay(relayEnd, relayServer, new NbdRelayOptions
        {
            Reconnect = _ => throw new InvalidOperationException("the server connection never ends in this test"),
            Name = "relay-test",
        });
        relay.Start();
        byte[] payload = Bytes(1 << 20, seed: 211);
        await SendAsync(kernel, (byte[])[.. Request(CmdWrite, 0x211, 0, (uint)payload.Length), .. payload], deadline.Token);
        await Wait.UntilAsync(() => server.Available > 0, "the write on its way to the server", deadline.Token);
        await SendAsync(kernel, Request(CmdRead, 0x212, 4096, 512), deadline.Token);
        await Task.Delay(100, deadline.Token);

        Socket? kept = null;
        Task<bool> handOver = Task.Run(() => relay.TryHandOver(Limit, s => kept = Duplicate(s)), deadline.Token);
        await Task.Delay(200, deadline.Token);

        Assert.Equal(0x211ul, ParseRequest(await ReceiveExactlyAsync(server, RequestLength, deadline.Token)).Cookie);
        Assert.Equal(payload, await ReceiveExactlyAsync(server, payload.Length, deadline.Token));
        await SendAsync(server, SimpleReply(0, 0x211), deadline.Token);
        Assert.Equal(0x212ul, ParseRequest(await ReceiveExactlyAsync(server, RequestLength, deadline.Token)).Cookie);
        await Task.Delay(200, deadline.Token);
        Assert.False(handOver.IsCompleted, "Handed over with the read's reply still owed.");
        byte[] data = Bytes(512, seed: 212);
        await SendAsync(server, (byte[])[.. SimpleReply(0, 0x212), .. data], deadline.Token);

        Assert.True(await handOver.WaitAsync(deadline.Token));
        Assert.Equal(0x211ul, ParseReply(await ReceiveExactlyAsync(kernel, SimpleReplyLength, deadline.Token)).Cookie);
        Assert.Equal(0x212ul, ParseReply(await ReceiveExactlyAsync(kernel, SimpleReplyLength, deadline.Token)).Cookie);
        Assert.Equal(data, await ReceiveExactlyAsync(kernel, 512, deadline.Token));
        kept!.Dispose();
    }

    [Fact(Timeout = 30_000)]
    public async Task HandOver_ServerNeverAnswers_FalseWithoutCallingKeepAndDisposeEndsTheKernelsConnection()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(AnswerFirst: 1));
        await using var harness = RelayHarness.Start(server);
        await WriteAsync(harness.Kernel, 0, Bytes(512, seed: 207), 0x207, deadline.Token);
        await harness.SendRequestAsync(CmdRead, 0x208, 0, 512, deadline.Token);
        await Wait.UntilAsync(() => server.Connections[0].Requests.Count == 2, "the held read at the server", deadline.Token);

        bool kept = false;
        Assert.False(harness.Relay.TryHandOver(TimeSpan.FromMilliseconds(300), _ => kept = true));
        Assert.False(kept);
        Assert.False(harness.Relay.Completion.IsCompleted, "The relay ended on a hand-over that did not happen.");

        harness.Relay.Dispose();
        Assert.Equal(NbdRelayEndReason.Stopped, (await harness.CompletionAsync(deadline.Token)).Reason);
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
    }

    [Fact(Timeout = 30_000)]
    public async Task HandOver_RelayAlreadyEnded_False()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        await using var harness = RelayHarness.Start(server);
        harness.Kernel.Shutdown(SocketShutdown.Both);
        Assert.Equal(NbdRelayEndReason.KernelClosed, (await harness.CompletionAsync(deadline.Token)).Reason);

        bool kept = false;
        Assert.False(harness.Relay.TryHandOver(Limit, _ => kept = true));
        Assert.False(kept);
    }

    [Fact(Timeout = 30_000)]
    public async Task HandOver_KeepThrows_PropagatesAndTheRelayStillDisposesAsUsual()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize);
        await using var harness = RelayHarness.Start(server);
        await WriteAsync(harness.Kernel, 0, Bytes(512, seed: 209), 0x209, deadline.Token);

        var thrown = Assert.Throws<IOException>(() => harness.Relay.TryHandOver(Limit, _ => throw new IOException("no store")));
        Assert.Equal("no store", thrown.Message);

        harness.Relay.Dispose();
        Assert.Equal(NbdRelayEndReason.Stopped, (await harness.CompletionAsync(deadline.Token)).Reason);
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
    }

    /// <summary>A relay over a received end, as the next process starts one, with a fresh connection to the server.</summary>
    private static NbdRelay StartOn(Socket relayEnd, InMemoryNbdServer server)
    {
        var relay = new NbdRelay(relayEnd, server.Connect(), new NbdRelayOptions
        {
            Reconnect = _ => Task.FromResult(server.Connect()),
            Name = "relay-test-next",
        });
        relay.Start();
        return relay;
    }
}

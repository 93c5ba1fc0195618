using System.Diagnostics;
using System.Net.Sockets;
using Microsoft.Extensions.Time.Testing;
using Nbd.Protocol.Tests.TestSupport;
using Nbd.Protocol.Transmission;
using static Nbd.Protocol.Tests.Transmission.RelayTest;
using static Nbd.Protocol.Tests.TestSupport.RawTransmission;

namespace Nbd.Protocol.Tests.Transmission;

/// <summary>How the relay gets its next server connection: retries, the give-up deadline, permanent failures, Dispose.</summary>
public sealed class NbdRelayReconnectTests
{
    /// <summary>
    /// .NET's timers count whole milliseconds, so a deadline timer may fire up to that much before a Stopwatch says it is
    /// due (seen: "Gave up after 3000 ms" failing `>= 3 s` by a fraction of a millisecond).
    /// </summary>
    private static readonly TimeSpan TimerTick = TimeSpan.FromMilliseconds(15);

    private static ConnectionScript FirstClosesAtOnce(int i) =>
        i == 0 ? new ConnectionScript(FaultAt: 1, Fault: ServerFault.CloseWithoutReply) : ConnectionScript.Normal;

    [Fact(Timeout = 30_000)]
    public async Task Relay_ReconnectFailsTwiceThenSucceeds_ReconnectFailedEventsThenOneReplyPerRequest()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, FirstClosesAtOnce);
        server.Fill(seed: 50);
        await using var harness = RelayHarness.Start(
            server,
            reconnect: (call, _) => call <= 2 ? throw new IOException($"refused #{call}") : Task.FromResult(server.Connect()),
            retryInterval: TimeSpan.FromMilliseconds(50));

        byte[] data = await ReadAsync(harness.Kernel, 4096, 4096, 0x51, deadline.Token);

        Assert.Equal(server.Disk.AsSpan(4096, 4096).ToArray(), data);
        Assert.Collection(
            harness.Events,
            e => Assert.Equal(1, Assert.IsType<NbdRelayServerLost>(e).InFlight),
            e => Assert.Equal((1, "refused #1"), (Assert.IsType<NbdRelayReconnectFailed>(e).Attempt, ((NbdRelayReconnectFailed)e).Exception.Message)),
            e => Assert.Equal((2, "refused #2"), (Assert.IsType<NbdRelayReconnectFailed>(e).Attempt, ((NbdRelayReconnectFailed)e).Exception.Message)),
            e => Assert.Equal((3, 1), (Assert.IsType<NbdRelayReconnected>(e).Attempts, ((NbdRelayReconnected)e).Resent)));
        Assert.Equal(1, harness.Relay.Reconnects);
        Assert.Equal(3, harness.ReconnectCalls);
        Assert.Equal([0x51UL], (await server.ConnectionAsync(1, deadline.Token)).Cookies);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_ReconnectNeverSucceeds_GivesUpAfterGiveUpAfterAndShutsKernelEndWithoutReply()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, FirstClosesAtOnce);
        // 3 s at 50 ms: the pauses come from pool timers, which a loaded host can make several times late, so a short
        // window counted too few attempts (CI: 2 in 600 ms). Load only lowers the count; the upper bound proves pacing.
        TimeSpan giveUpAfter = TimeSpan.FromSeconds(3);
        await using var harness = RelayHarness.Start(
            server,
            reconnect: (_, _) => throw new SocketException((int)SocketError.ConnectionRefused),
            giveUpAfter: giveUpAfter,
            retryInterval: TimeSpan.FromMilliseconds(50));
        var clock = Stopwatch.StartNew();

        await harness.SendRequestAsync(CmdRead, 0x61, 0, 512, deadline.Token);
        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);
        TimeSpan elapsed = clock.Elapsed;

        Assert.Equal(NbdRelayEndReason.GaveUp, end.Reason);
        Assert.True(elapsed >= giveUpAfter - TimerTick, $"Gave up after {elapsed.TotalMilliseconds:0} ms, before GiveUpAfter.");
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
        Assert.Equal(0, harness.Relay.Reconnects);
        Assert.IsType<NbdRelayServerLost>(harness.Events[0]);
        Assert.True(harness.Events.Skip(1).All(e => e is NbdRelayReconnectFailed), "Only failed attempts may follow the loss.");
        Assert.InRange(harness.ReconnectCalls, 3, 61);
        Assert.Equal(harness.ReconnectCalls, harness.Events.Count - 1);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_RetryIntervalLongerThanGiveUpAfter_NoAttemptStartsAfterTheDeadline()
    {
        // One failed attempt, then the pause runs into the deadline: the relay must give up there, not start another
        // attempt (and give that one another full GiveUpAfter to hang in).
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, FirstClosesAtOnce);
        TimeSpan giveUpAfter = TimeSpan.FromMilliseconds(1500);
        await using var harness = RelayHarness.Start(
            server,
            reconnect: async (call, ct) =>
            {
                if (call == 1)
                {
                    throw new IOException("refused");
                }

                await Task.Delay(Timeout.Infinite, ct);
                throw new InvalidOperationException("unreachable");
            },
            giveUpAfter: giveUpAfter,
            retryInterval: TimeSpan.FromSeconds(30));
        var clock = Stopwatch.StartNew();

        await harness.SendRequestAsync(CmdRead, 0x62, 0, 512, deadline.Token);
        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);

        Assert.Equal(NbdRelayEndReason.GaveUp, end.Reason);
        Assert.Equal(1, harness.ReconnectCalls);
        Assert.True(clock.Elapsed < giveUpAfter + TimeSpan.FromSeconds(5), $"Gave up after {clock.Elapsed.TotalMilliseconds:0} ms; GiveUpAfter is {giveUpAfter.TotalMilliseconds} ms.");
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_ReconnectHangsOnInjectedClock_CancelledAndGivesUpWhenThatClockPassesGiveUpAfter()
    {
        // Everything time-dependent goes through the injected TimeProvider, the attempt's deadline included.
        using var deadline = Deadline();
        var time = new FakeTimeProvider();
        await using var server = new InMemoryNbdServer(DiskSize, FirstClosesAtOnce);
        var attemptStarted = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        await using var harness = RelayHarness.Start(
            server,
            reconnect: async (_, ct) =>
            {
                attemptStarted.TrySetResult();
                await Task.Delay(Timeout.Infinite, ct);
                throw new InvalidOperationException("unreachable");
            },
            giveUpAfter: TimeSpan.FromSeconds(30),
            timeProvider: time);

        await harness.SendRequestAsync(CmdRead, 0x63, 0, 512, deadline.Token);
        await attemptStarted.Task.WaitAsync(deadline.Token);
        time.Advance(TimeSpan.FromSeconds(31));
        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);

        Assert.Equal(NbdRelayEndReason.GaveUp, end.Reason);
        Assert.Equal(1, harness.ReconnectCalls);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_EveryNewConnectionDiesBeforeAnswering_OneOutageThatPacesAttemptsAndGivesUp()
    {
        // Each new connection takes the resent request and closes (a request that crashes the server, a server that
        // drops every connection): that is no recovery, so the outage and its give-up clock go on, and attempts keep
        // to RetryInterval instead of spinning.
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(FaultAt: 1, Fault: ServerFault.CloseWithoutReply));
        TimeSpan giveUpAfter = TimeSpan.FromSeconds(3);
        await using var harness = RelayHarness.Start(server, giveUpAfter: giveUpAfter, retryInterval: TimeSpan.FromMilliseconds(100));
        var clock = Stopwatch.StartNew();

        await harness.SendRequestAsync(CmdRead, 0x64, 0, 512, deadline.Token);
        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);

        Assert.Equal(NbdRelayEndReason.GaveUp, end.Reason);
        Assert.True(clock.Elapsed >= giveUpAfter - TimerTick, $"Gave up after {clock.Elapsed.TotalMilliseconds:0} ms.");
        Assert.InRange(harness.ReconnectCalls, 3, 31);
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
        Assert.All(server.Connections, c => Assert.Equal([0x64UL], c.Cookies));
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_EveryNewConnectionClosedAtOnceWhileIdle_PacedAndGivesUp()
    {
        // Nothing in flight, and every connection closed right after its handshake: each reconnect "succeeded", so the
        // relay connected and handshook back to back, for ever (a core busy, a warning per cycle in the journal).
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, _ => new ConnectionScript(HangUpAtOnce: true));
        TimeSpan giveUpAfter = TimeSpan.FromSeconds(2);
        await using var harness = RelayHarness.Start(server, giveUpAfter: giveUpAfter, retryInterval: TimeSpan.FromMilliseconds(100));
        var clock = Stopwatch.StartNew();

        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);

        Assert.Equal(NbdRelayEndReason.GaveUp, end.Reason);
        Assert.True(clock.Elapsed >= giveUpAfter - TimerTick, $"Gave up after {clock.Elapsed.TotalMilliseconds:0} ms.");
        Assert.InRange(harness.ReconnectCalls, 2, 25);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_ServerAnswersEshutdown_SoftDisconnectAndTheRequestIsAnsweredOnTheNextConnection()
    {
        // nbdkit on SIGTERM answers what it read meanwhile with NBD_ESHUTDOWN; passed on, the kernel would fail the I/O.
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, i => i == 0 ? new ConnectionScript(FaultAt: 2, Fault: ServerFault.ShuttingDown) : ConnectionScript.Normal);
        server.Fill(seed: 70);
        await using var harness = RelayHarness.Start(server, retryInterval: TimeSpan.FromMilliseconds(50));

        byte[] first = await ReadAsync(harness.Kernel, 0, 4096, 0xE1, deadline.Token);
        byte[] second = await ReadAsync(harness.Kernel, 8192, 4096, 0xE2, deadline.Token); // ESHUTDOWN, then connection 2

        Assert.Equal(server.Disk.AsSpan(0, 4096).ToArray(), first);
        Assert.Equal(server.Disk.AsSpan(8192, 4096).ToArray(), second);
        ServerConnection shuttingDown = await server.ConnectionAsync(0, deadline.Token);
        await shuttingDown.Ended.WaitAsync(deadline.Token);
        Assert.Equal([CmdRead, CmdRead, CmdDisc], shuttingDown.Requests.Select(r => r.Fields.Type));
        Assert.Equal([0xE2UL], (await server.ConnectionAsync(1, deadline.Token)).Cookies);
        Assert.Equal(1, harness.Relay.Reconnects);
        Assert.Equal("the server is shutting down: NBD_ESHUTDOWN for cookie 0x00000000000000e2", Assert.IsType<NbdRelayServerLost>(harness.Events[0]).Reason);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_RequestsArriveWhileReconnecting_SentOnceAfterTheResentOnesInKernelOrder()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, i => i == 0 ? new ConnectionScript(AnswerFirst: 0, FaultAt: 2, Fault: ServerFault.CloseWithoutReply) : ConnectionScript.Normal);
        server.Fill(seed: 60);
        byte[] disk = server.Disk;
        var gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        await using var harness = RelayHarness.Start(
            server,
            reconnect: async (_, ct) =>
            {
                await gate.Task.WaitAsync(ct);
                return server.Connect();
            });
        byte[] written = Bytes(8192, seed: 61);
        var expectedReads = new Dictionary<ulong, byte[]>
        {
            [0xB1] = disk.AsSpan(0, 512).ToArray(),
            [0xB2] = disk.AsSpan(4096, 1024).ToArray(),
            [0xB4] = written,
        };
        Task<List<(RawReply, byte[])>> replies = ReceiveRepliesAsync(harness, 4, expectedReads, new HashSet<ulong> { 0xB1, 0xB2, 0xB3, 0xB4 }, deadline.Token);

        await harness.SendAsync([.. Request(CmdRead, 0xB1, 0, 512), .. Request(CmdRead, 0xB2, 4096, 1024)], deadline.Token);
        await Wait.UntilAsync(() => harness.ReconnectCalls == 1, "the reconnect attempt", deadline.Token);
        byte[] write = [.. Request(CmdWrite, 0xB3, 65536, 8192), .. written];
        await harness.SendAsync([.. write, .. Request(CmdRead, 0xB4, 65536, 8192)], deadline.Token);
        await Wait.UntilAsync(() => harness.Relay.InFlight == 4, "four requests waiting", deadline.Token);
        gate.SetResult();
        await replies;

        ServerConnection second = await server.ConnectionAsync(1, deadline.Token);
        Assert.Equal([0xB1UL, 0xB2, 0xB3, 0xB4], second.Cookies);
        Assert.Equal(written, second.Requests[2].Data);
        Assert.Collection(
            harness.Events,
            e => Assert.Equal(2, Assert.IsType<NbdRelayServerLost>(e).InFlight),
            e => Assert.Equal(4, Assert.IsType<NbdRelayReconnected>(e).Resent));
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_KernelClosesWhileReconnecting_EndsKernelClosedAndCancelsTheAttempt()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, FirstClosesAtOnce);
        var attemptCancelled = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        await using var harness = RelayHarness.Start(
            server,
            reconnect: async (_, ct) =>
            {
                using CancellationTokenRegistration registration = ct.Register(attemptCancelled.SetResult);
                await Task.Delay(Timeout.Infinite, ct);
                throw new InvalidOperationException("unreachable");
            },
            giveUpAfter: TimeSpan.FromMinutes(5));
        await harness.SendRequestAsync(CmdRead, 0x91, 0, 512, deadline.Token);
        await Wait.UntilAsync(() => harness.ReconnectCalls == 1, "the reconnect attempt", deadline.Token);

        harness.Kernel.Shutdown(SocketShutdown.Both);

        Assert.Equal(NbdRelayEndReason.KernelClosed, (await harness.CompletionAsync(deadline.Token)).Reason);
        await attemptCancelled.Task.WaitAsync(deadline.Token);
        Assert.Equal(0, harness.Relay.Reconnects);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_EventCallbackThrows_DataPathUnaffected()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, FirstClosesAtOnce);
        server.Fill(seed: 70);
        await using var harness = RelayHarness.Start(server, eventsThrow: true);

        byte[] data = await ReadAsync(harness.Kernel, 512, 512, 0x77, deadline.Token);

        Assert.Equal(server.Disk.AsSpan(512, 512).ToArray(), data);
        Assert.Equal(1, harness.Relay.Reconnects);
        Assert.Equal(2, harness.Events.Count);
    }

    [Theory(Timeout = 30_000)]
    [InlineData(100.0)]
    [InlineData(double.PositiveInfinity)]
    public async Task Relay_GiveUpAfterBeyondTimerRange_ReconnectsAsUsual(double days)
    {
        // 100 days, or TimeSpan.MaxValue for "never": longer than any timer can run, and no reason to fail an attempt.
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, FirstClosesAtOnce);
        server.Fill(seed: 80);
        await using var harness = RelayHarness.Start(server, giveUpAfter: double.IsInfinity(days) ? TimeSpan.MaxValue : TimeSpan.FromDays(days));

        byte[] data = await ReadAsync(harness.Kernel, 0, 512, 0x85, deadline.Token);

        Assert.Equal(server.Disk.AsSpan(0, 512).ToArray(), data);
        Assert.Equal(1, harness.ReconnectCalls);
        Assert.Equal(1, harness.Relay.Reconnects);
    }

    [Theory]
    [InlineData(-1, 20)]
    [InlineData(-1000, 20)]
    [InlineData(10_000, -1)]
    [InlineData(10_000, 50L * 24 * 3600 * 1000)]
    public async Task Constructor_TimesOutOfRange_ThrowsArgumentOutOfRange(long giveUpAfterMs, long retryIntervalMs)
    {
        await using var server = new InMemoryNbdServer(DiskSize);
        (Socket relayEnd, Socket kernel) = RelayHarness.UnixPair();
        using Socket serverSocket = server.Connect();
        using (relayEnd)
        using (kernel)
        {
            var options = new NbdRelayOptions
            {
                Reconnect = _ => Task.FromResult(server.Connect()),
                GiveUpAfter = TimeSpan.FromMilliseconds(giveUpAfterMs),
                RetryInterval = TimeSpan.FromMilliseconds(retryIntervalMs),
            };

            Assert.Throws<ArgumentOutOfRangeException>(() => new NbdRelay(relayEnd, serverSocket, options));
        }
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_GiveUpAfterZero_GivesUpWithoutAnAttempt()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, FirstClosesAtOnce);
        await using var harness = RelayHarness.Start(server, giveUpAfter: TimeSpan.Zero);

        await harness.SendRequestAsync(CmdRead, 0x86, 0, 512, deadline.Token);

        Assert.Equal(NbdRelayEndReason.GaveUp, (await harness.CompletionAsync(deadline.Token)).Reason);
        Assert.Equal(0, harness.ReconnectCalls);
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_ReconnectFailsPermanently_GivesUpAtOnce()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, FirstClosesAtOnce);
        await using var harness = RelayHarness.Start(
            server,
            reconnect: (_, _) => throw new InvalidDataException("the export changed size"),
            giveUpAfter: TimeSpan.FromMinutes(5),
            isPermanent: e => e is InvalidDataException);

        await harness.SendRequestAsync(CmdRead, 0x71, 0, 512, deadline.Token);
        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);

        Assert.Equal(NbdRelayEndReason.GaveUp, end.Reason);
        Assert.IsType<InvalidDataException>(end.Exception);
        Assert.Equal(1, harness.ReconnectCalls);
        Assert.IsType<NbdRelayServerLost>(Assert.Single(harness.Events));
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
    }

    [Fact(Timeout = 30_000)]
    public async Task Relay_IsPermanentThrows_EndsFailedAndClosesTheKernelsEndInsteadOfCrashing()
    {
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, FirstClosesAtOnce);
        await using var harness = RelayHarness.Start(
            server,
            reconnect: (_, _) => throw new IOException("refused"),
            giveUpAfter: TimeSpan.FromMinutes(5),
            isPermanent: _ => throw new InvalidOperationException("classifier bug"));

        await harness.SendRequestAsync(CmdRead, 0x72, 0, 512, deadline.Token);
        NbdRelayEnd end = await harness.CompletionAsync(deadline.Token);

        Assert.Equal(NbdRelayEndReason.Failed, end.Reason);
        Assert.IsType<InvalidOperationException>(end.Exception);
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
    }

    [Theory(Timeout = 30_000)]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Dispose_WhileReconnecting_ReturnsPromptlyWithStopped(bool attemptHangs)
    {
        // Either inside a pause between attempts (a long RetryInterval) or inside an attempt that waits on its token.
        using var deadline = Deadline();
        await using var server = new InMemoryNbdServer(DiskSize, FirstClosesAtOnce);
        await using var harness = RelayHarness.Start(
            server,
            reconnect: async (_, ct) =>
            {
                if (attemptHangs)
                {
                    await Task.Delay(Timeout.Infinite, ct);
                }

                throw new IOException("refused");
            },
            giveUpAfter: TimeSpan.FromMinutes(5),
            retryInterval: TimeSpan.FromMinutes(1));
        await harness.SendRequestAsync(CmdRead, 0x81, 0, 512, deadline.Token);
        await Wait.UntilAsync(() => harness.ReconnectCalls == 1 && harness.Events.Count == (attemptHangs ? 1 : 2), "the first reconnect attempt", deadline.Token);
        await Task.Delay(100, deadline.Token);

        // Timed on a thread of its own: a busy thread pool must not count against Dispose.
        TimeSpan took = TimeSpan.Zero;
        var disposer = new Thread(() =>
        {
            var clock = Stopwatch.StartNew();
            harness.Relay.Dispose();
            took = clock.Elapsed;
        });
        disposer.Start();
        await Wait.UntilAsync(() => !disposer.IsAlive, "Dispose", deadline.Token);

        Assert.True(took < TimeSpan.FromSeconds(5), $"Dispose took {took.TotalMilliseconds:0} ms.");
        Assert.Equal(NbdRelayEndReason.Stopped, (await harness.CompletionAsync(deadline.Token)).Reason);
        Assert.Equal(1, harness.ReconnectCalls);
        await harness.ExpectKernelEndOfStreamAsync(deadline.Token);
    }
}

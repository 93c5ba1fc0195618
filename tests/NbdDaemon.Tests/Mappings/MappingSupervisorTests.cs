using System.Net.Sockets;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Time.Testing;
using Nbd.Kernel;
using NbdDaemon.Configuration;
using NbdDaemon.Mappings;
using NbdDaemon.Tests.Systemd;

namespace NbdDaemon.Tests.Mappings;

public sealed class MappingSupervisorTests
{
    private static readonly TimeSpan TestTimeout = TimeSpan.FromSeconds(10);

    /// <summary>Routes each mapping (by name) to its own scripted connector.</summary>
    private sealed class RoutingConnector(Dictionary<string, FakeConnector> routes) : INbdConnector
    {
        public Task<INbdSession> ConnectAsync(MappingOptions mapping, CancellationToken cancellationToken) =>
            routes[mapping.Name].ConnectAsync(mapping, cancellationToken);
    }

    [Fact]
    public async Task StartAsync_OneMappingRefusedOneHanging_ThirdStillServesAndStatusNamesFailure()
    {
        var time = new FakeTimeProvider();
        var kernel = new FakeKernel();
        var connector = new RoutingConnector(new()
        {
            ["root"] = new FakeConnector().ThenServe(),
            ["data"] = new FakeConnector().ThenRefuse(),
            ["logs"] = new FakeConnector().ThenServe(),
        });
        MappingOptions[] mappings =
        [
            TestMappings.Create("root", device: "/dev/nbd0"),
            TestMappings.Create("data", device: "/dev/nbd1"),
            TestMappings.Create("logs", device: "/dev/nbd2"),
        ];
        using var supervisor = new MappingSupervisor(mappings, connector, kernel, time, NullLoggerFactory.Instance, () => 0.0);

        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);

        Assert.Equal(MappingState.Serving, supervisor.Loops[0].State);
        Assert.Equal(MappingState.Reconnecting, supervisor.Loops[1].State);
        Assert.Equal(MappingState.Serving, supervisor.Loops[2].State);
        Assert.Equal("2 of 3 mappings serving; failing: data (connection refused)", supervisor.StatusText);
        Assert.True(supervisor.IsHealthy());

        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
        Assert.All(supervisor.Loops, l => Assert.Equal(MappingState.Stopped, l.State));
    }

    [Fact]
    public async Task StartAsync_FirstAttemptStillRunning_NotReadyUntilItCompletes()
    {
        var time = new FakeTimeProvider();
        var kernel = new FakeKernel();
        var gate = new TaskCompletionSource<INbdSession>(TaskCreationOptions.RunContinuationsAsynchronously);
        var connector = new RoutingConnector(new()
        {
            ["fast"] = new FakeConnector().ThenServe(),
            ["slow"] = new FakeConnector().Then(_ => gate.Task),
        });
        using var supervisor = new MappingSupervisor(
            [TestMappings.Create("fast", device: "/dev/nbd0"), TestMappings.Create("slow", device: "/dev/nbd1")],
            connector, kernel, time, NullLoggerFactory.Instance);

        // Subscribed before the start: the fast mapping may reach Serving before StartAsync returns.
        var serving = new StateRecorder(supervisor.Loops[0]);
        Task start = supervisor.StartAsync(CancellationToken.None);
        await serving.WaitForAsync(MappingState.Serving);
        await Task.Delay(100);
        Assert.False(start.IsCompleted);

        gate.SetResult(new FakeSession(FakeConnector.DefaultExport));
        await start.WaitAsync(TestTimeout);
        Assert.Equal("2 of 2 mappings serving", supervisor.StatusText);
        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
    }

    [Fact]
    public async Task StopAsync_MappingConnectHangs_AllStopWithinBound()
    {
        var time = new FakeTimeProvider();
        var kernel = new FakeKernel();
        var connector = new RoutingConnector(new()
        {
            ["a"] = new FakeConnector().ThenServe(),
            ["b"] = new FakeConnector().ThenRefuse().ThenHang(),
        });
        using var supervisor = new MappingSupervisor(
            [TestMappings.Create("a", device: "/dev/nbd0"), TestMappings.Create("b", device: "/dev/nbd1")],
            connector, kernel, time, NullLoggerFactory.Instance, () => 0.0);
        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);
        var b = new StateRecorder(supervisor.Loops[1]);
        time.Advance(TimeSpan.FromSeconds(1));
        await b.WaitForAsync(MappingState.Connecting);

        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);

        Assert.All(supervisor.Loops, l => Assert.Equal(MappingState.Stopped, l.State));
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task StartAsync_MappingWithoutDevice_NeverTakesTheDeviceAnotherMappingNames(bool netlink)
    {
        // "pinned" names nbd7, which looks free because its server is down at boot; "any" has no Device. Taking nbd7
        // would make an fstab entry for nbd7 mount the other export, and leave "pinned" refused forever.
        KernelInterface kernelInterface = netlink ? KernelInterface.Netlink : KernelInterface.Ioctl;
        var kernel = new FakeKernel();
        foreach (int free in new[] { 7, 8 })
        {
            kernel.SysfsOnly[free] = new KernelDeviceInfo(free, 0, 512, null, Connected: false, ReadOnly: false);
        }

        var connector = new RoutingConnector(new() { ["pinned"] = new FakeConnector().ThenRefuse(), ["any"] = new FakeConnector().ThenServe() });
        MappingOptions[] mappings =
        [
            TestMappings.Create("pinned", kernelInterface, device: "/dev/nbd7"),
            TestMappings.Create("any", kernelInterface, device: null),
        ];
        using var supervisor = new MappingSupervisor(mappings, connector, kernel, new FakeTimeProvider(), NullLoggerFactory.Instance, () => 0.0);

        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);

        Assert.Equal(MappingState.Serving, supervisor.Loops[1].State);
        Assert.Equal("/dev/nbd8", supervisor.Loops[1].Device);
        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
    }

    [Fact]
    public async Task StartAsync_FirstAttemptOutlastsTheReadyDeadline_ReturnsAtTheDeadlineAndTheMappingGoesOn()
    {
        // A Timeout of minutes and a server that drops packets: READY=1 must still come before systemd's start timeout.
        var time = new FakeTimeProvider();
        var connector = new RoutingConnector(new()
        {
            ["fast"] = new FakeConnector().ThenServe(),
            ["slow"] = new FakeConnector().Then(async ct =>
            {
                await Task.Delay(Timeout.InfiniteTimeSpan, ct);
                throw new InvalidOperationException("unreachable");
            }),
        });
        MappingOptions[] mappings = [TestMappings.Create("fast", device: "/dev/nbd1"), TestMappings.Create("slow", device: "/dev/nbd2", timeout: TimeSpan.FromMinutes(5))];
        using var supervisor = new MappingSupervisor(mappings, connector, new FakeKernel(), time, NullLoggerFactory.Instance, () => 0.0);

        Task start = supervisor.StartAsync(CancellationToken.None);
        await TestMappings.WaitUntilAsync(() => supervisor.Loops[0].State == MappingState.Serving);
        Assert.False(start.IsCompleted);
        time.Advance(MappingSupervisor.ReadyDeadline - TimeSpan.FromSeconds(1));
        await Task.Delay(100);
        Assert.False(start.IsCompleted);
        time.Advance(TimeSpan.FromSeconds(1));
        await start.WaitAsync(TestTimeout);

        Assert.Equal(MappingState.Connecting, supervisor.Loops[1].State);
        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
        Assert.Equal(MappingState.Stopped, supervisor.Loops[1].State);
    }

    [Fact]
    public async Task StartAsync_NetlinkWithoutDevice_PickedDeviceOpenElsewhere_NextAttemptPicksAnother()
    {
        // nbd7 is named by "pinned" (no server), so "any" picks itself; nbd8 looks free in sysfs but is open in some
        // process, so CONNECT fails EBUSY: the retry must not pick nbd8 again (the kernel's own pick skips it too).
        var kernel = new FakeKernel();
        foreach (int free in new[] { 7, 8, 9 })
        {
            kernel.SysfsOnly[free] = new KernelDeviceInfo(free, 0, 512, null, Connected: false, ReadOnly: false);
        }

        kernel.OpenedElsewhere.Add(8);
        var connector = new RoutingConnector(new() { ["pinned"] = new FakeConnector().ThenRefuse(), ["any"] = new FakeConnector().ThenServe() });
        MappingOptions[] mappings =
        [
            TestMappings.Create("pinned", KernelInterface.Netlink, device: "/dev/nbd7"),
            TestMappings.Create("any", KernelInterface.Netlink, device: null),
        ];
        var time = new FakeTimeProvider();
        using var supervisor = new MappingSupervisor(mappings, connector, kernel, time, NullLoggerFactory.Instance, () => 0.0);
        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);
        MappingLoop any = supervisor.Loops[1];
        Assert.Equal(MappingState.Reconnecting, any.State);
        Assert.Contains("EBUSY", any.LastFailure, StringComparison.Ordinal);

        time.Advance(TimeSpan.FromSeconds(2));
        await TestMappings.WaitUntilAsync(() => any.State == MappingState.Serving);

        Assert.Equal("/dev/nbd9", any.Device);
        Assert.Equal(["nl-connect 8", "nl-connect 9"], kernel.Operations.Where(o => o.StartsWith("nl-connect", StringComparison.Ordinal)).Select(o => string.Join(' ', o.Split(' ')[..2])));
        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
    }

    [Theory]
    [InlineData(5, true, true)]
    [InlineData(9.9, true, true)]
    [InlineData(10, true, false)]
    [InlineData(5, false, false)] // no store: no journal to carry across a crash
    public void Constructor_RelayTimeoutShorterThanARestart_Warned(double timeoutSeconds, bool canStore, bool warned)
    {
        using var store = new FakeFileDescriptorStore(canStore);
        var logs = new ListLogger();
        TimeSpan timeout = TimeSpan.FromSeconds(timeoutSeconds);
        MappingOptions[] mappings =
        [
            TestMappings.Create("fs", KernelInterface.Netlink, device: "/dev/nbd0", timeout: timeout) with { Relay = true },
            TestMappings.Create("direct", KernelInterface.Netlink, device: "/dev/nbd1", timeout: timeout), // no relay: nothing to carry
            TestMappings.Create("old", KernelInterface.Ioctl, device: "/dev/nbd2", timeout: timeout) with { Relay = true }, // dies with the process
        ];

        using var supervisor = new MappingSupervisor(mappings, new FakeConnector(), new FakeKernel(), new FakeTimeProvider(), logs, () => 0.0, store);

        string[] lines = [.. logs.Entries.Where(e => e.Message.Contains("crash restart", StringComparison.Ordinal)).Select(e => e.Message)];
        if (warned)
        {
            Assert.Equal([$"Mapping fs: Timeout {timeoutSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture)} s may be shorter than a crash restart of the daemon (the unit's RestartSec= plus the start; 10 s allowed for): the driver would end the relay's connection before the next process carries it on from its journal, and the requests in flight would wait for a new one; raise Timeout"], lines);
        }
        else
        {
            Assert.Empty(lines);
        }
    }

    [Theory]
    [InlineData(12, false)]
    [InlineData(11, true)]
    [InlineData(null, false)] // systemd before 254 does not say
    public void Constructor_RelayJournalsBeyondTheStore_WarnedOnceAtStart(int? capacity, bool warned)
    {
        using var store = new FakeFileDescriptorStore(capacity: capacity);
        var logs = new ListLogger();
        MappingOptions[] mappings =
        [
            TestMappings.Create("fs", KernelInterface.Netlink, device: "/dev/nbd0") with { Relay = true, OnStop = StopAction.Leave, Connections = 2 },
            TestMappings.Create("db", KernelInterface.Netlink, device: "/dev/nbd1") with { Relay = true, OnStop = StopAction.Leave },
            TestMappings.Create("scratch", KernelInterface.Netlink, device: "/dev/nbd2") with { Relay = true }, // disconnected at a stop, journaled all the same
            TestMappings.Create("old", KernelInterface.Ioctl, device: "/dev/nbd4") with { Relay = true }, // an ioctl device dies with the process
            TestMappings.Create("plain", KernelInterface.Netlink, device: "/dev/nbd3") with { OnStop = StopAction.Leave }, // no relay end
        ];

        using var supervisor = new MappingSupervisor(mappings, new FakeConnector(), new FakeKernel(), new FakeTimeProvider(), logs, () => 0.0, store);

        string[] lines = [.. logs.Entries.Where(e => e.Message.Contains("keep their journals", StringComparison.Ordinal)).Select(e => e.Message)];
        if (warned)
        {
            Assert.Equal(["4 relay connections keep their journals in systemd's file descriptor store (12 descriptors, 3 each), but it holds 11 (FileDescriptorStoreMax=): those beyond it keep none, and a crash of the daemon ends their kernel connections (the driver resends after its Timeout); raise FileDescriptorStoreMax= in a drop-in"], lines);
        }
        else
        {
            Assert.Empty(lines);
        }
    }

    [Fact]
    public async Task StartAsync_RelayEndsHandedOver_KeptWhileTheirMappingTriesReleasedOnceItServes()
    {
        // A server down across `systemctl restart`: the first attempt fails before the relay took its end back. Closing the
        // end then would leave the requests the kernel queued in it waiting for the hand-over timeout (60 s).
        using var store = new FakeFileDescriptorStore();
        var kernelEnds = new List<Socket>();
        // A lone member of a journal group of each too (a group is never taken unless whole).
        foreach (string name in new[] { "nbd-relay/fs/0", "nbd-relay/fs/1", "nbd-relay/gone/0", "nbd-relay/plain/0", "nbd-journal/fs/a1/relay-end", "nbd-journal/gone/b2/relay-end" })
        {
            (Socket kernelEnd, Socket relayEnd) = NbdSocketPair.Create();
            store.Store(name, relayEnd);
            relayEnd.Dispose();
            kernelEnds.Add(kernelEnd);
        }

        Socket? taken = null;
        var connector = new RoutingConnector(new()
        {
            ["fs"] = new FakeConnector().ThenRefuse().Then(_ =>
            {
                taken = store.Take("nbd-relay/fs/")?.Socket;
                return Task.FromResult<INbdSession>(new FakeSession(FakeConnector.DefaultExport));
            }),
            ["plain"] = new FakeConnector().ThenServe(),
        });
        MappingOptions[] mappings =
        [
            TestMappings.Create("fs", KernelInterface.Netlink, device: "/dev/nbd0") with { Relay = true },
            TestMappings.Create("plain", KernelInterface.Netlink, device: "/dev/nbd1"),
        ];
        var time = new FakeTimeProvider();
        using var supervisor = new MappingSupervisor(mappings, connector, new FakeKernel(), time, NullLoggerFactory.Instance, () => 0.0, store);

        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);

        // Those of no relay mapping are gone at once; "fs" is still trying, and keeps both of its own.
        Assert.Equal(MappingState.Reconnecting, supervisor.Loops[0].State);
        Assert.Equal(["nbd-relay/fs/0", "nbd-relay/fs/1", "nbd-journal/fs/a1/relay-end"], store.Names);
        Assert.Equal(0, ReceiveOrEnd(kernelEnds[2]));
        Assert.Equal(0, ReceiveOrEnd(kernelEnds[3]));
        Assert.Equal(0, ReceiveOrEnd(kernelEnds[5]));

        time.Advance(TimeSpan.FromSeconds(2));
        await TestMappings.WaitUntilAsync(() => supervisor.Loops[0].State == MappingState.Serving);

        // It took one back; the other is surplus (fewer connections than before) and closed.
        using (taken)
        {
            Assert.NotNull(taken);
            Assert.Empty(store.Names);
            Assert.Equal(0, ReceiveOrEnd(kernelEnds[1]));
            Assert.Equal(0, ReceiveOrEnd(kernelEnds[4]));
            taken.Send([1]);
            Assert.Equal(1, ReceiveOrEnd(kernelEnds[0]));
        }

        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
        kernelEnds.ForEach(k => k.Dispose());
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task StopAsync_RelayEndHandedOver_MappingNeverServed_LeftForTheNextStartUnlessItGaveUp(bool givesUp)
    {
        using var store = new FakeFileDescriptorStore();
        (Socket kernelEnd, Socket relayEnd) = NbdSocketPair.Create();
        using (kernelEnd)
        {
            store.Store("nbd-relay/fs/0", relayEnd);
            relayEnd.Dispose();
            var connector = new RoutingConnector(new() { ["fs"] = new FakeConnector().ThenRefuse() });
            MappingOptions fs = TestMappings.Create("fs", KernelInterface.Netlink, device: "/dev/nbd0",
                reconnect: new ReconnectOptions(true, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(60), givesUp ? 1 : 0)) with { Relay = true };
            using var supervisor = new MappingSupervisor([fs], connector, new FakeKernel(), new FakeTimeProvider(), NullLoggerFactory.Instance, () => 0.0, store);

            await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);
            await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);

            Assert.Equal(givesUp ? MappingState.GaveUp : MappingState.Stopped, supervisor.Loops[0].State);
            Assert.Equal(givesUp ? [] : ["nbd-relay/fs/0"], store.Names);
        }
    }

    /// <summary>Bytes received (1 at most), or 0 when the other end was closed; fails after 5 s of neither.</summary>
    private static int ReceiveOrEnd(Socket socket)
    {
        socket.ReceiveTimeout = 5000;
        return socket.Receive(new byte[1]);
    }

    [Fact]
    public async Task StartAsync_TwoIoctlMappingsWithoutDevice_EachGetsItsOwn()
    {
        // sysfs shows a device free until its NBD_DO_IT runs, and SET_BLKSIZE/SIZE/FLAGS have no owner check: two
        // mappings starting together must not both configure the first free device.
        var kernel = new FakeKernel();
        var connector = new RoutingConnector(new() { ["a"] = new FakeConnector().ThenServe(), ["b"] = new FakeConnector().ThenServe() });
        MappingOptions[] mappings = [TestMappings.Create("a", device: null), TestMappings.Create("b", device: null)];
        using var supervisor = new MappingSupervisor(mappings, connector, kernel, new FakeTimeProvider(), NullLoggerFactory.Instance, () => 0.0);

        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);

        Assert.All(supervisor.Loops, l => Assert.Equal(MappingState.Serving, l.State));
        Assert.Equal(["/dev/nbd7", "/dev/nbd8"], supervisor.Loops.Select(l => l.Device!).Order());
        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
    }

    [Fact]
    public async Task StopAsync_TeardownsThatBlock_RunSideBySideAndTheHostTimeoutStillApplies()
    {
        // A teardown blocks in the kernel (NBD_CMD_DISCONNECT to a server that stopped reading, a relay hand-over
        // waiting for owed replies): mapping B's must not wait for mapping A's, nor the host's stop for either.
        var kernel = new FakeKernel();
        var started = new System.Collections.Concurrent.ConcurrentQueue<long>();
        var connector = new RoutingConnector(new() { ["a"] = new FakeConnector().ThenServe(), ["b"] = new FakeConnector().ThenServe() });
        MappingOptions[] mappings =
        [
            TestMappings.Create("a", KernelInterface.Netlink, device: "/dev/nbd1"),
            TestMappings.Create("b", KernelInterface.Netlink, device: "/dev/nbd2"),
        ];
        using var supervisor = new MappingSupervisor(mappings, connector, kernel, TimeProvider.System, NullLoggerFactory.Instance, () => 0.0);
        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);
        Assert.All(supervisor.Loops, l => Assert.Equal(MappingState.Serving, l.State));
        kernel.OnOperation = op =>
        {
            if (op.StartsWith("nl-disconnect", StringComparison.Ordinal))
            {
                started.Enqueue(System.Diagnostics.Stopwatch.GetTimestamp());
                Thread.Sleep(3000);
            }
        };

        var stopwatch = System.Diagnostics.Stopwatch.StartNew();
        using var hostTimeout = new CancellationTokenSource(TimeSpan.FromSeconds(1));
        await supervisor.StopAsync(hostTimeout.Token).WaitAsync(TestTimeout);
        TimeSpan returned = stopwatch.Elapsed;
        await TestMappings.WaitUntilAsync(() => started.Count == 2 && supervisor.Loops.All(l => l.State == MappingState.Stopped));

        Assert.True(returned < TimeSpan.FromSeconds(2.5), $"StopAsync returned after {returned} with a 1 s host timeout");
        long[] starts = [.. started];
        TimeSpan apart = System.Diagnostics.Stopwatch.GetElapsedTime(starts.Min(), starts.Max());
        Assert.True(apart < TimeSpan.FromSeconds(1.5), $"the second disconnect started {apart} after the first");
    }

    [Fact]
    public async Task StartAsync_LoopThrowsUnexpectedly_OnlyThatMappingFails()
    {
        var time = new FakeTimeProvider();
        var kernel = new FakeKernel
        {
            OnOperation = op =>
            {
                if (op == "open /dev/nbd1")
                {
                    throw new InvalidOperationException("boom");
                }
            },
        };
        var connector = new RoutingConnector(new() { ["ok"] = new FakeConnector().ThenServe(), ["bad"] = new FakeConnector().ThenServe() });
        using var supervisor = new MappingSupervisor(
            [TestMappings.Create("ok", device: "/dev/nbd0"), TestMappings.Create("bad", device: "/dev/nbd1", reconnect: ReconnectOptions.Default with { Enabled = false })],
            connector, kernel, time, NullLoggerFactory.Instance);

        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);

        Assert.Equal(MappingState.Serving, supervisor.Loops[0].State);
        Assert.Equal(MappingState.GaveUp, supervisor.Loops[1].State);
        Assert.Equal("1 of 2 mappings serving; failing: bad (gave up: boom)", supervisor.StatusText);
        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
        Assert.Equal(MappingState.GaveUp, supervisor.Loops[1].State);
    }

    [Fact]
    public async Task StartAsync_NoMappings_ReadyImmediately()
    {
        using var logger = new ListLogger();
        using var supervisor = new MappingSupervisor([], new FakeConnector(), new FakeKernel(), TimeProvider.System, logger);

        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);

        Assert.Equal("no mappings configured", supervisor.StatusText);
        // A misspelled section leaves a daemon that maps nothing: it says so, and where mappings come from.
        Assert.Contains(logger.Entries, e => e.Level == Microsoft.Extensions.Logging.LogLevel.Warning && e.Message.StartsWith("No mappings configured: nothing to map. Mappings are read from Nbd:Mappings in", StringComparison.Ordinal));
        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
    }
}

public sealed class MappingStatusTests
{
    [Fact]
    public void Format_AllServing_CountsOnly() =>
        Assert.Equal("3 of 3 mappings serving", MappingStatus.Format([("a", MappingState.Serving, null), ("b", MappingState.Serving, null), ("c", MappingState.Serving, null)]));

    [Fact]
    public void Format_MixedStates_ListsFailingWithReasonsAndTerminalPrefix() =>
        Assert.Equal(
            "1 of 4 mappings serving; failing: data (connection refused), logs (gave up: export size changed from 1 to 2 bytes), tls (failed: server requires TLS)",
            MappingStatus.Format(
            [
                ("root", MappingState.Serving, null),
                ("data", MappingState.Reconnecting, "connection refused"),
                ("logs", MappingState.GaveUp, "export size changed from 1 to 2 bytes"),
                ("tls", MappingState.Failed, "server requires TLS"),
            ]));

    [Fact]
    public void Format_FirstAttemptInProgress_NotListedAsFailing() =>
        Assert.Equal("0 of 1 mappings serving", MappingStatus.Format([("a", MappingState.Connecting, null)]));

    [Fact]
    public void Format_LongReason_Truncated()
    {
        string text = MappingStatus.Format([("a", MappingState.Reconnecting, new string('x', 500))]);
        Assert.Equal("0 of 1 mappings serving; failing: a (" + new string('x', MappingStatus.MaxReasonLength) + "…)", text);
    }

    [Fact]
    public void Format_LongReasonCutInsideASurrogatePair_PairDroppedWhole()
    {
        // "😀" is two UTF-16 units; placed so that the cut at MaxReasonLength falls between them.
        string failure = new string('x', MappingStatus.MaxReasonLength - 1) + "😀" + new string('y', 10);
        string text = MappingStatus.Format([("a", MappingState.Reconnecting, failure)]);
        Assert.Equal("0 of 1 mappings serving; failing: a (" + new string('x', MappingStatus.MaxReasonLength - 1) + "…)", text);
        Assert.DoesNotContain("\uFFFD", System.Text.Encoding.UTF8.GetString(System.Text.Encoding.UTF8.GetBytes(text)), StringComparison.Ordinal);
    }

    [Fact]
    public void Format_LongReasonEndingOnAWholePair_PairKept()
    {
        string failure = new string('x', MappingStatus.MaxReasonLength - 2) + "😀" + new string('y', 10);
        string text = MappingStatus.Format([("a", MappingState.Reconnecting, failure)]);
        Assert.Equal("0 of 1 mappings serving; failing: a (" + new string('x', MappingStatus.MaxReasonLength - 2) + "😀…)", text);
    }
}

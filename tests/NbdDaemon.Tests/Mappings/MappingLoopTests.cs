using System.Net.Sockets;
using Microsoft.Extensions.Logging.Abstractions;
using NbdDaemon.Configuration;
using NbdDaemon.Mappings;

namespace NbdDaemon.Tests.Mappings;

public sealed class MappingLoopTests
{
    private static readonly TimeSpan TestTimeout = TimeSpan.FromSeconds(10);
    private readonly ArmedTimeProvider _time = new();
    private readonly FakeKernel _kernel = new();

    [Fact]
    public async Task RunAsync_Ioctl_ConfiguresDeviceInKernelOrderAndServes()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);

        await running.WaitForAsync(MappingState.Serving);

        Assert.Equal([MappingState.Connecting, MappingState.Negotiating, MappingState.ConfiguringKernel, MappingState.Serving], running.States);
        Assert.Equal(["open /dev/nbd3", "blksize 4096", "size 1073741824", "flags 257", "timeout 30", "set-sock", "do-it data"], _kernel.Operations);
        Assert.True(loop.FirstAttemptCompleted.IsCompleted);
        Assert.Equal("/dev/nbd3", loop.Device);
        Assert.Null(loop.LastFailure);
        await running.StopAsync();
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task RunAsync_ServerAnnouncesAMaximumPayload_RequestsCappedAtIt(bool netlink)
    {
        KernelInterface kernelInterface = netlink ? KernelInterface.Netlink : KernelInterface.Ioctl;
        // A server taking at most 64 KiB per request: the driver's 128 KiB requests would be refused (I/O errors).
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { MaximumPayload = 65536 });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: kernelInterface), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);

        await running.WaitForAsync(MappingState.Serving);

        Assert.Equal(64u, _kernel.MaxSectorsKb[3]);
        if (kernelInterface == KernelInterface.Ioctl)
        {
            // Before the kernel has a socket: no request goes out uncapped.
            Assert.Equal(["open /dev/nbd3", "blksize 4096", "size 1073741824", "flags 257", "timeout 30", "limit-request 3 65536", "set-sock", "do-it data"], _kernel.Operations);
        }
        else
        {
            // Before CONNECT (the driver starts the device there, and udev may read at once) and after it (a device the
            // kernel created at CONNECT had no queue to limit before).
            List<string> operations = [.. _kernel.Operations];
            int connect = operations.FindIndex(o => o.StartsWith("nl-connect", StringComparison.Ordinal));
            Assert.Equal("limit-request 3 65536", operations[connect - 1]);
            Assert.Equal("limit-request 3 65536", operations[connect + 1]);
        }

        await running.StopAsync();
    }

    /// <summary>Given up, the device gets back the limit it had: its next user must not inherit this server's maximum.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task StopAsync_Disconnect_RequestSizeLimitPutBack(bool netlink)
    {
        KernelInterface kernelInterface = netlink ? KernelInterface.Netlink : KernelInterface.Ioctl;
        _kernel.MaxSectorsKb[3] = 512;
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { MaximumPayload = 65536 });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: kernelInterface), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        Assert.Equal(64u, _kernel.MaxSectorsKb[3]);

        await running.StopAsync();

        Assert.Equal(512u, _kernel.MaxSectorsKb[3]);
        Assert.Equal("restore-request 3 64 512", Assert.Single(_kernel.Operations, o => o.StartsWith("restore-request", StringComparison.Ordinal)));
    }

    [Fact]
    public async Task StopAsync_Leave_RequestSizeLimitKept()
    {
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { MaximumPayload = 65536 });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, onStop: StopAction.Leave), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        await running.StopAsync();

        Assert.Equal(64u, _kernel.MaxSectorsKb[3]);
        Assert.DoesNotContain(_kernel.Operations, o => o.StartsWith("restore-request", StringComparison.Ordinal));
    }

    [Fact]
    public async Task StopAsync_LimitChangedBySomeoneElse_LeftAsTheySetIt()
    {
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { MaximumPayload = 65536 });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        _kernel.MaxSectorsKb[3] = 32; // an admin's echo into sysfs

        await running.StopAsync();

        Assert.Equal(32u, _kernel.MaxSectorsKb[3]);
    }

    /// <summary>An ioctl reconnect closes the device (another client may open it meanwhile): put back, then capped again.</summary>
    [Fact]
    public async Task RunAsync_IoctlReconnect_LimitPutBackWhileClosedAndCappedAgain()
    {
        var export = FakeConnector.DefaultExport with { MaximumPayload = 65536 };
        var connector = new FakeConnector().ThenServe(export);
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time, () => 1.0);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        _kernel.Devices[0].Loop!.End();
        await running.WaitForAsync(MappingState.Reconnecting);
        Assert.Equal(128u, _kernel.MaxSectorsKb[3]);
        _time.Advance(TimeSpan.FromSeconds(1));
        await running.WaitForAsync(MappingState.Serving, 2);

        Assert.Equal(64u, _kernel.MaxSectorsKb[3]);
        await running.StopAsync();
        Assert.Equal(128u, _kernel.MaxSectorsKb[3]);
    }

    /// <summary>
    /// A refused connect came with a dozen lines of .NET stack trace at Warning; its reason says it all. The trace is
    /// still there at Debug, and a failure nobody explained (a bug) keeps it on the Warning line.
    /// </summary>
    /// <summary>
    /// The attempt's deadline runs out before the client's own handshake timeout (both are the mapping's Timeout): the
    /// daemon's line said only "not done within", where the verbs say that no NBD greeting came.
    /// </summary>
    [Theory]
    [InlineData(true, null, "connect and handshake not done within 10 s (the mapping's Timeout): the connection was accepted, but no NBD greeting came (is an NBD server listening there, and is it stuck?)")]
    [InlineData(false, "the reply header to NBD_OPT_GO", "connect and handshake not done within 10 s (the mapping's Timeout): the handshake was waiting for the reply header to NBD_OPT_GO")]
    public async Task RunAsync_DeadlineDuringTheHandshake_SaysWhatItWaitedFor(bool noGreeting, string? awaiting, string expected)
    {
        var connector = new FakeConnector().Then(async ct =>
        {
            try
            {
                await Task.Delay(Timeout.Infinite, ct);
            }
            catch (OperationCanceledException e)
            {
                throw new Nbd.Protocol.NbdHandshakeCanceledException(awaiting ?? "the server greeting (NBDMAGIC + magic)", noGreeting, e, ct);
            }

            throw new InvalidOperationException("unreachable");
        });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(timeout: TimeSpan.FromSeconds(10)), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Connecting);
        await TestMappings.WaitUntilAsync(() => _time.Armed(TimeSpan.FromSeconds(10)) == 1);

        _time.Advance(TimeSpan.FromSeconds(10));
        await running.WaitForAsync(MappingState.Reconnecting);

        Assert.Equal(expected, loop.LastFailure);
        await running.StopAsync();
    }

    [Theory]
    [InlineData("refused")]
    [InlineData("bug")]
    [InlineData("wrapped bug")]
    public async Task RunAsync_ExplainedFailure_WarningWithoutStackTrace_TraceAtDebug_AnUnexplainedOneKeepsIt(string failure)
    {
        var logger = new ListLogger();
        bool explained = failure == "refused";
        var connector = new FakeConnector().Then(_ => Task.FromException<INbdSession>(failure switch
        {
            "refused" => new SocketException((int)SocketError.ConnectionRefused),
            "bug" => new InvalidOperationException("a bug"),
            _ => new MappingException("a bug", inner: new NullReferenceException()), // as ServeAsync wraps what the service loop throws
        }));
        var loop = new MappingLoop(TestMappings.Create(), connector, _kernel, _time, logger, () => 1.0);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Reconnecting);
        await running.StopAsync();

        var line = Assert.Single(logger.Records, r => r.Message.Contains(explained ? "-> Reconnecting; connection refused" : "-> Reconnecting; a bug", StringComparison.Ordinal));
        Assert.Equal(Microsoft.Extensions.Logging.LogLevel.Warning, line.Level);
        var traces = logger.Records.Where(r => r.Message.Contains("the failure above, with its stack trace", StringComparison.Ordinal)).ToList();
        if (explained)
        {
            Assert.Null(line.Exception);
            var trace = Assert.Single(traces);
            Assert.Equal(Microsoft.Extensions.Logging.LogLevel.Debug, trace.Level);
            Assert.IsType<SocketException>(trace.Exception);
        }
        else
        {
            Assert.NotNull(line.Exception);
            Assert.Empty(traces);
        }
    }

    /// <summary>
    /// An attempt that fails because the stop under way ended it (not with a cancellation: a connection the stop closed)
    /// was counted as a failure: with MaxAttempts reached the mapping went to GaveUp, whose teardown disconnects even an
    /// OnStop: Leave device, instead of Stopping.
    /// </summary>
    [Fact]
    public async Task RunAsync_AttemptFailsBecauseOfTheStop_StoppedNotGaveUp()
    {
        var connector = new FakeConnector().Then(async ct =>
        {
            try
            {
                await Task.Delay(Timeout.Infinite, ct);
            }
            catch (OperationCanceledException)
            {
            }

            throw new IOException("connection closed by the stop");
        });
        MappingLoop loop = TestMappings.Loop(
            TestMappings.Create(kernelInterface: KernelInterface.Netlink, reconnect: ReconnectOptions.Default with { MaxAttempts = 1 }, onStop: StopAction.Leave),
            connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Connecting);

        await running.StopAsync();

        Assert.Equal(MappingState.Stopped, loop.State);
        Assert.DoesNotContain(_kernel.Operations, o => o.StartsWith("nl-disconnect", StringComparison.Ordinal));
    }

    /// <summary>
    /// A stop whose NBD_DISCONNECT is still stuck in the driver (ETIMEDOUT from the bounded disconnect) holds the device's
    /// config_lock: the NBD_CLEAR_SOCK the teardown then sent waited for it uninterruptibly, and the process could not
    /// exit, SIGKILL included. Only the descriptor is closed now.
    /// </summary>
    [Fact]
    public async Task RunAsync_IoctlStopWhoseDisconnectIsStuck_NoClearSockBehindIt()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Ioctl), connector, _kernel, _time);
        using var cts = new CancellationTokenSource();
        var states = new StateRecorder(loop, s =>
        {
            if (s == MappingState.Serving)
            {
                _kernel.DisconnectFailure = new Nbd.Kernel.NbdKernelException("/dev/nbd3", "NBD_DISCONNECT", 110);
                cts.Cancel();
            }
        });

        Task run = loop.RunAsync(cts.Token);
        using var deadline = new CancellationTokenSource(TestTimeout);
        while (!run.IsCompleted && !deadline.IsCancellationRequested)
        {
            _time.Advance(TimeSpan.FromSeconds(1)); // through the wait for NBD_DO_IT to return
            await Task.Delay(10);
        }

        await run.WaitAsync(TestTimeout);
        string[] teardown = [.. _kernel.Operations.SkipWhile(o => o != "loop-stop")];
        Assert.Equal("loop-stop", teardown[0]);
        Assert.DoesNotContain("clear-sock", teardown);
        Assert.StartsWith("close ", teardown[^1], StringComparison.Ordinal);
        Assert.Equal(MappingState.Stopped, states.States[^1]);
    }

    /// <summary>Nothing said that an export came read-only from the server, or that a partial last block was left out.</summary>
    [Theory]
    [InlineData(1UL << 30, false, false, 1, "-> Serving; 1073741824 bytes, 262144 blocks of 4096, read-write")]
    [InlineData((1UL << 30) + 1000, true, false, 1, "-> Serving; 1073741824 bytes, 262144 blocks of 4096 (the export's last 1000 bytes, less than a block, not mapped), read-only (the server exports it read-only)")]
    [InlineData(1UL << 30, false, true, 2, "-> Serving; 1073741824 bytes, 262144 blocks of 4096, read-only (ReadOnly), 2 connections")]
    public async Task RunAsync_Serving_LineSaysSizeAccessAndConnections(ulong size, bool serverReadOnly, bool readOnly, int connections, string expected)
    {
        var logger = new ListLogger();
        ushort flags = (ushort)(FakeConnector.DefaultExport.TransmissionFlags | (serverReadOnly ? ExportDescription.FlagReadOnly : 0));
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { Size = size, TransmissionFlags = flags });
        var options = TestMappings.Create(kernelInterface: connections > 1 ? KernelInterface.Netlink : KernelInterface.Ioctl, readOnly: readOnly, connections: connections);
        var loop = new MappingLoop(options, connector, _kernel, _time, logger, () => 1.0);
        await using var running = RunningLoop.Start(loop);

        await running.WaitForAsync(MappingState.Serving);

        Assert.Single(logger.Entries, e => e.Message.EndsWith(expected, StringComparison.Ordinal));
        await running.StopAsync();
    }

    [Theory]
    [InlineData(null, 8192u, null, "the server's minimum block size 8192 is above 4096, the largest nbd-daemon gives the kernel (the page size, the most every kernel's nbd driver takes): this export cannot be mapped")]
    [InlineData(512u, 4096u, null, "the server's minimum block size 4096 is above BlockSize 512: set BlockSize to 4096")]
    [InlineData(4096u, null, 2048u, "the server takes at most 2048 bytes per request, less than one block of 4096: set BlockSize to 2048 or less")]
    [InlineData(4096u, null, 3000u, "the server takes at most 3000 bytes per request, less than one block of 4096: set BlockSize to 2048 or less")]
    public async Task RunAsync_BlockSizeTheServerDoesNotTake_ReasonSaysWhatToChange(uint? configured, uint? minimum, uint? maximum, string expected)
    {
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { MinimumBlockSize = minimum, MaximumPayload = maximum });
        var loop = new MappingLoop(TestMappings.Create() with { BlockSize = configured }, connector, _kernel, _time, NullLogger.Instance, () => 1.0);
        await using var running = RunningLoop.Start(loop);

        await running.WaitForAsync(MappingState.Reconnecting);

        Assert.Equal(expected, loop.LastFailure);
        Assert.DoesNotContain(_kernel.Operations, o => o.StartsWith("blksize", StringComparison.Ordinal));
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_RequestsCannotBeCapped_ServesAnywayAndSaysWhy()
    {
        var logger = new ListLogger();
        _kernel.LimitRequestSizeFailure = new Nbd.Kernel.NbdKernelException("/dev/nbd3", "open /sys/block/nbd3/queue/max_sectors_kb", 30);
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { MaximumPayload = 65536 });
        var loop = new MappingLoop(TestMappings.Create(), connector, _kernel, _time, logger, () => 1.0);
        await using var running = RunningLoop.Start(loop);

        await running.WaitForAsync(MappingState.Serving);

        // Said once: a reconnect fails the same way and says nothing new.
        _kernel.Devices[0].Loop!.End();
        await running.WaitForAsync(MappingState.Reconnecting);
        _time.Advance(TimeSpan.FromSeconds(1));
        await running.WaitForAsync(MappingState.Serving, 2);
        Assert.Equal(2, _kernel.Operations.Count(o => o.StartsWith("limit-request", StringComparison.Ordinal)));
        var warning = Assert.Single(logger.Entries, e => e.Message.Contains("could not be capped", StringComparison.Ordinal));
        Assert.Equal(Microsoft.Extensions.Logging.LogLevel.Warning, warning.Level);
        Assert.Contains("takes at most 65536 bytes per request, and the device's requests could not be capped", warning.Message, StringComparison.Ordinal);
        Assert.Contains("EROFS", warning.Message, StringComparison.Ordinal);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_ServiceLoopEnds_ClearsClosesAndReopensSameDeviceAfterBackoff()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        FakeSession first = connector.Sessions.Single();

        _kernel.Devices[0].Loop!.End();
        await running.WaitForAsync(MappingState.Reconnecting);

        Assert.Equal(TimeSpan.FromSeconds(1), loop.LastDelay);
        Assert.Equal("connection lost (service loop ended)", loop.LastFailure);
        Assert.True(first.Disposed);
        // The driver keeps a dead socket in the configuration until the device is closed: close, then reopen.
        Assert.Equal(["clear-que", "clear-sock", "close /dev/nbd7"], _kernel.Operations.Skip(7));
        Assert.Equal(1, connector.Calls);

        _time.Advance(TimeSpan.FromSeconds(1));
        await running.WaitForAsync(MappingState.Serving, 2);

        // The unused device chosen first is the one reopened, not a new unused one.
        Assert.Equal(2, _kernel.Devices.Count);
        Assert.Equal("/dev/nbd7", loop.Device);
        Assert.Equal(["open /dev/nbd7", "blksize 4096", "size 1073741824", "flags 257", "timeout 30", "set-sock", "do-it data"], _kernel.Operations.Skip(10));
        Assert.Equal(0, loop.FailedAttempts);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_IoctlDeviceStillHeldAfterTheLoss_NoSocketUntilClosedThenServes()
    {
        // A mounted filesystem keeps the old configuration (sysfs pid) after we closed the device: NBD_SET_SOCK would
        // append a socket the kernel then holds connected until the last close, and NBD_DO_IT would fail with EBUSY.
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        _kernel.SysfsOnly[7] = new KernelDeviceInfo(7, 1UL << 30, 4096, null, Connected: true, ReadOnly: false);

        _kernel.Devices[0].Loop!.End();
        await running.WaitForAsync(MappingState.Reconnecting, 1);
        _time.Advance(TimeSpan.FromSeconds(1));
        await running.WaitForAsync(MappingState.Reconnecting, 2);
        _time.Advance(TimeSpan.FromSeconds(2));
        await running.WaitForAsync(MappingState.Reconnecting, 3);

        Assert.StartsWith("/dev/nbd7 is still held open", loop.LastFailure, StringComparison.Ordinal);
        Assert.Single(_kernel.Operations, "set-sock");
        Assert.Equal(3, loop.FailedAttempts); // the loss and two refusals: the backoff grows, MaxAttempts counts them
        Assert.All(connector.Sessions, s => Assert.True(s.Disposed));

        _kernel.SysfsOnly.TryRemove(7, out _); // the last opener closed it: the configuration is gone
        _time.Advance(TimeSpan.FromSeconds(4));
        await running.WaitForAsync(MappingState.Serving, 2);
        Assert.Equal("/dev/nbd7", loop.Device);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_ServerRefusesRepeatedly_BackoffDoublesUpToCap()
    {
        var connector = new FakeConnector().ThenRefuse();
        var reconnect = new ReconnectOptions(true, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(60), 0);
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(reconnect: reconnect), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);

        var delays = new List<double>();
        for (int i = 1; i <= 9; i++)
        {
            await running.WaitForAsync(MappingState.Reconnecting, i);
            delays.Add(loop.LastDelay!.Value.TotalSeconds);
            _time.Advance(loop.LastDelay.Value);
        }

        Assert.Equal([1, 2, 4, 8, 16, 32, 60, 60, 60], delays);
        Assert.Equal("connection refused", loop.LastFailure);
        Assert.Empty(_kernel.Operations);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_MaxAttemptsReached_GivesUpAndEnds()
    {
        var connector = new FakeConnector().ThenRefuse();
        var reconnect = new ReconnectOptions(true, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(60), 3);
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(reconnect: reconnect), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);

        await running.WaitForAsync(MappingState.Reconnecting, 1);
        _time.Advance(TimeSpan.FromSeconds(1));
        await running.WaitForAsync(MappingState.Reconnecting, 2);
        _time.Advance(TimeSpan.FromSeconds(2));
        await running.EndedAsync();

        Assert.Equal(MappingState.GaveUp, loop.State);
        Assert.Equal(3, connector.Calls);
        Assert.Equal(3, loop.FailedAttempts);
        Assert.Equal("connection refused", loop.LastFailure);
    }

    [Fact]
    public async Task RunAsync_ReconnectDisabled_GivesUpAfterFirstFailure()
    {
        var connector = new FakeConnector().ThenRefuse();
        var reconnect = new ReconnectOptions(false, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(60), 0);
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(reconnect: reconnect), connector, _kernel, _time);

        await loop.RunAsync(CancellationToken.None).WaitAsync(TestTimeout);

        Assert.Equal(MappingState.GaveUp, loop.State);
        Assert.Equal(1, connector.Calls);
    }

    [Fact]
    public async Task RunAsync_ExportSizeChanged_RefusesWithoutTouchingKernelThenResumesWhenRestored()
    {
        var bigger = FakeConnector.DefaultExport with { Size = 2UL << 30 };
        var connector = new FakeConnector().ThenServe().ThenServe(bigger).ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        _kernel.Devices[0].Loop!.End();
        await running.WaitForAsync(MappingState.Reconnecting, 1);
        int opsBefore = _kernel.Operations.Count;

        _time.Advance(TimeSpan.FromSeconds(1));
        await running.WaitForAsync(MappingState.Reconnecting, 2);

        Assert.Equal("export size changed from 1073741824 to 2147483648 bytes", loop.LastFailure);
        Assert.Equal(MappingState.Negotiating, running.States[^2]);
        Assert.Equal(opsBefore, _kernel.Operations.Count);
        Assert.True(connector.Sessions.ElementAt(1).Disposed);
        Assert.Equal(TimeSpan.FromSeconds(2), loop.LastDelay);

        _time.Advance(TimeSpan.FromSeconds(2));
        await running.WaitForAsync(MappingState.Serving, 2);
        // Opened twice (closed after the lost connection), both times the same device, sized as before.
        Assert.Equal(["/dev/nbd3", "/dev/nbd3"], _kernel.Devices.Select(d => d.Path));
        Assert.Equal(1UL << 30, _kernel.Devices[^1].Size);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_ExportBecameReadOnly_Refused()
    {
        var readOnly = FakeConnector.DefaultExport with { TransmissionFlags = ExportDescription.FlagHasFlags | ExportDescription.FlagReadOnly };
        var connector = new FakeConnector().ThenServe().ThenServe(readOnly);
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        _kernel.Devices[0].Loop!.End();
        await running.WaitForAsync(MappingState.Reconnecting, 1);

        _time.Advance(TimeSpan.FromSeconds(1));
        await running.WaitForAsync(MappingState.Reconnecting, 2);

        Assert.Equal("export became read-only", loop.LastFailure);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_PermanentFailure_EndsInFailedWithoutRetry()
    {
        var connector = new FakeConnector().Then(_ => Task.FromException<INbdSession>(new MappingException("server requires TLS", FailureKind.Permanent)));
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time);

        await loop.RunAsync(CancellationToken.None).WaitAsync(TestTimeout);

        Assert.Equal(MappingState.Failed, loop.State);
        Assert.Equal("server requires TLS", loop.LastFailure);
        Assert.Equal(1, connector.Calls);
    }

    [Fact]
    public async Task RunAsync_ConnectHangs_AttemptTimesOutAfterMappingTimeout()
    {
        var connector = new FakeConnector().ThenHang();
        var logger = new ListLogger();
        var loop = new MappingLoop(TestMappings.Create(timeout: TimeSpan.FromSeconds(10)), connector, _kernel, _time, logger, () => 1.0);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Connecting);
        // Connecting is announced before the attempt arms its deadline.
        await TestMappings.WaitUntilAsync(() => _time.Armed(TimeSpan.FromSeconds(10)) == 1);

        _time.Advance(TimeSpan.FromSeconds(9));
        Assert.Equal(MappingState.Connecting, loop.State);
        _time.Advance(TimeSpan.FromSeconds(1));
        await running.WaitForAsync(MappingState.Reconnecting);

        // The deadline covers the connect and the handshake: naming only the connect sent admins looking at the network
        // when the server had accepted and never greeted.
        Assert.Equal("connect and handshake not done within 10 s (the mapping's Timeout)", loop.LastFailure);
        await running.StopAsync();

        // The most ordinary failure there is (a server host down or firewalled): its reason says it all, and the
        // cancellation inside is no bug; it came with ~30 lines of stack trace at Warning on attempts 1, 2, 4, 8, …
        var line = Assert.Single(logger.Records, r => r.Message.Contains("-> Reconnecting; connect and handshake not done within 10 s", StringComparison.Ordinal));
        Assert.Equal(Microsoft.Extensions.Logging.LogLevel.Warning, line.Level);
        Assert.Null(line.Exception);
    }

    [Theory]
    [InlineData("Ioctl", "Connecting")]
    [InlineData("Ioctl", "Negotiating")]
    [InlineData("Ioctl", "ConfiguringKernel")]
    [InlineData("Ioctl", "Serving")]
    [InlineData("Ioctl", "Reconnecting")]
    [InlineData("Netlink", "Connecting")]
    [InlineData("Netlink", "Negotiating")]
    [InlineData("Netlink", "ConfiguringKernel")]
    [InlineData("Netlink", "Serving")]
    [InlineData("Netlink", "Reconnecting")]
    public async Task RunAsync_StopRequestedInState_TearsDownAndStops(string interfaceName, string stateName)
    {
        var kernelInterface = Enum.Parse<KernelInterface>(interfaceName);
        var stopIn = Enum.Parse<MappingState>(stateName);
        var connector = new FakeConnector();
        if (stopIn == MappingState.Reconnecting)
        {
            connector.ThenRefuse();
        }
        else
        {
            connector.ThenServe();
        }

        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: kernelInterface), connector, _kernel, _time);
        using var cts = new CancellationTokenSource();
        var states = new StateRecorder(loop, s =>
        {
            if (s == stopIn)
            {
                cts.Cancel();
            }
        });

        await loop.RunAsync(cts.Token).WaitAsync(TestTimeout);

        Assert.Equal([stopIn, MappingState.Stopping, MappingState.Stopped], states.States.Skip(states.States.Count - 3));
        Assert.All(connector.Sessions, s => Assert.True(s.Disposed));
        bool configured = stopIn is MappingState.ConfiguringKernel or MappingState.Serving;
        if (configured && kernelInterface == KernelInterface.Ioctl)
        {
            // One NBD_DISCONNECT and one NBD_CLEAR_SOCK (the loop's stop): a second DISCONNECT fails against the closed
            // connection and the driver logs it at every stop.
            Assert.Equal(["clear-que", "loop-stop", "disconnect", "clear-sock", "close /dev/nbd3"], _kernel.Operations.Skip(7));
        }
        else if (configured)
        {
            Assert.Equal(["nl-disconnect 3", "netlink close"], _kernel.Operations.Skip(2));
        }
        else if (kernelInterface == KernelInterface.Netlink)
        {
            // Subscribed to LINK_DEAD from the start, but no device was configured: nothing to disconnect.
            Assert.Equal(["netlink open", "netlink close"], _kernel.Operations);
        }
        else
        {
            Assert.Empty(_kernel.Operations);
        }
    }

    [Fact]
    public async Task RunAsync_StoppedBeforeStart_NeverConnects()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time);
        var states = new StateRecorder(loop);

        await loop.RunAsync(new CancellationToken(canceled: true)).WaitAsync(TestTimeout);

        Assert.Equal([MappingState.Stopping, MappingState.Stopped], states.States);
        Assert.Equal(0, connector.Calls);
        Assert.True(loop.FirstAttemptCompleted.IsCompleted);
    }

    [Fact]
    public async Task RunAsync_GaveUpThenStopRequested_StaysGaveUp()
    {
        var connector = new FakeConnector().ThenRefuse();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(reconnect: ReconnectOptions.Default with { Enabled = false }), connector, _kernel, _time);
        using var cts = new CancellationTokenSource();
        await loop.RunAsync(cts.Token).WaitAsync(TestTimeout);

        await cts.CancelAsync();

        Assert.Equal(MappingState.GaveUp, loop.State);
        Assert.Empty(_kernel.Operations);
    }

    /// <summary>
    /// The lost connection counted as the first failed attempt: with MaxAttempts 1 the mapping gave up at the loss itself,
    /// without a single reconnect, and with 3 it made 2.
    /// </summary>
    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    public async Task RunAsync_IoctlConnectionLost_MaxAttemptsCountsTheReconnectsOnly(int maxAttempts)
    {
        var connector = new FakeConnector().ThenServe().ThenRefuse();
        var logger = new ListLogger();
        var loop = new MappingLoop(
            TestMappings.Create(reconnect: ReconnectOptions.Default with { MaxAttempts = maxAttempts }), connector, _kernel, _time, logger, () => 1.0);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        _kernel.Devices[0].Loop!.End();
        await RetryUntilGaveUpAsync(loop, running);
        Assert.Equal(1 + maxAttempts, connector.Calls);
        Assert.Contains(logger.Entries, e => e.Message.EndsWith($"-> GaveUp; connection refused (after {maxAttempts} failed attempts)", StringComparison.Ordinal));
    }

    [Theory]
    [InlineData("Ioctl", "close /dev/nbd3")]
    [InlineData("Netlink", "netlink close")]
    public async Task RunAsync_GivesUpAfterServing_ReleasesDevice(string interfaceName, string lastOperation)
    {
        var connector = new FakeConnector().ThenServe().ThenRefuse();
        var reconnect = ReconnectOptions.Default with { MaxAttempts = 2 };
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: Enum.Parse<KernelInterface>(interfaceName), reconnect: reconnect), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        if (_kernel.Netlink is { } netlink)
        {
            netlink.RaiseLinkDead();
        }
        else
        {
            _kernel.Devices[0].Loop!.End();
        }

        // Netlink retries fast (not counted) while the kernel holds I/O (DeadConnectionTimeout, 120 s), then backs off.
        await RetryUntilGaveUpAsync(loop, running);

        Assert.Equal(MappingState.GaveUp, loop.State);
        Assert.Equal(lastOperation, _kernel.Operations[^1]);
        if (_kernel.Netlink is not null)
        {
            Assert.Equal("nl-disconnect 3", _kernel.Operations[^2]);
        }

        Assert.Equal("0 of 1 mappings serving; failing: data (gave up: connection refused)", MappingStatus.Format([loop]));
    }

    [Fact]
    public async Task RunAsync_StopWhileConnectHangs_ReturnsPromptly()
    {
        var connector = new FakeConnector().ThenHang();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Connecting);

        await running.StopAsync();

        Assert.Equal(MappingState.Stopped, loop.State);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task RunAsync_ExportNotWholeBlocks_DeviceRoundedDownOnBothInterfaces(bool netlink)
    {
        KernelInterface kernelInterface = netlink ? KernelInterface.Netlink : KernelInterface.Ioctl;
        // A partial last block past the capacity would fail every read of the device's tail (udev, blkid, dd) with EIO.
        var export = FakeConnector.DefaultExport with { Size = (1UL << 30) + 2048 };
        var connector = new FakeConnector().ThenServe(export);
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: kernelInterface, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        ulong size = netlink ? _kernel.Netlink!.LastConnect!.SizeBytes : _kernel.Devices.Single().Size;
        Assert.Equal(1UL << 30, size);
    }

    [Fact]
    public async Task RunAsync_ExportSmallerThanOneBlock_FailsNamingItWithoutTouchingTheKernel()
    {
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { Size = 2048 });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Reconnecting);

        Assert.Contains("export is 2048 bytes, less than one block of 4096 bytes", loop.LastFailure, StringComparison.Ordinal);
        Assert.DoesNotContain(_kernel.Operations, op => op.StartsWith("nl-connect", StringComparison.Ordinal));
    }

    [Fact]
    public async Task RunAsync_NetlinkLinkDead_ReconfiguresSameIndexAtOnceWithNewSocket()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        Assert.Equal("/dev/nbd5", loop.Device);
        Assert.Equal("nbd-daemon:data", _kernel.Netlink!.LastConnect!.BackendIdentifier);

        _kernel.Netlink.RaiseLinkDead();
        // The kernel holds the I/O: no backoff before the first attempt, no time has to pass.
        await running.WaitForAsync(MappingState.Serving, 2);

        Assert.Equal(TimeSpan.Zero, loop.LastDelay);
        Assert.True(connector.Sessions.First().ShutDown);
        Assert.True(connector.Sessions.First().Disposed);
        Assert.Equal(TimeSpan.FromSeconds(30), _kernel.ReadSendTimeout(connector.Sessions.Last().Socket));
        Assert.Equal(
            ["netlink open", "nl-connect 5 size 1073741824 socks 1 id nbd-daemon:data", "nl-link-dead 5", "nl-reconfigure 5 socks 1 id nbd-daemon:data"],
            _kernel.Operations);
        await running.StopAsync();
        Assert.Equal("nl-disconnect 5", _kernel.Operations[^2]);
    }

    [Fact]
    public async Task RunAsync_NetlinkReconfigureFails_ConnectsAgainOnSameIndex()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        _kernel.Netlink!.FailReconfigure = true;

        _kernel.Netlink.RaiseLinkDead();
        await running.WaitForAsync(MappingState.Reconnecting);
        _time.Advance(TimeSpan.FromSeconds(1));
        await running.WaitForAsync(MappingState.Serving, 2);

        Assert.Equal("nl-connect 3 size 1073741824 socks 1 id nbd-daemon:data", _kernel.Operations[^1]);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_TwoConnectionsWithMultiConn_HandsBothSocketsToKernel()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(connections: 2), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        Assert.Equal(2, connector.Calls);
        Assert.Equal(2, _kernel.Operations.Count(o => o == "set-sock"));
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_TwoConnectionsWithoutMultiConn_FailsPermanently()
    {
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { TransmissionFlags = ExportDescription.FlagHasFlags });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(connections: 2), connector, _kernel, _time);

        await loop.RunAsync(CancellationToken.None).WaitAsync(TestTimeout);

        Assert.Equal(MappingState.Failed, loop.State);
        Assert.StartsWith("server does not allow 2 connections", loop.LastFailure, StringComparison.Ordinal);
        Assert.All(connector.Sessions, s => Assert.True(s.Disposed));
    }

    [Theory]
    [InlineData(512u, "blksize 512")]
    [InlineData(65536u, "blksize 4096")]
    [InlineData(1000u, "blksize 4096")]
    public async Task RunAsync_NoConfiguredBlockSize_UsesUsablePreferredElse4096(uint preferred, string expected)
    {
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { PreferredBlockSize = preferred });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        Assert.Equal(expected, _kernel.Operations[1]);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_ReadOnlyMapping_SetsReadOnlyFlag()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(readOnly: true), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        Assert.Equal(ExportDescription.FlagReadOnly, _kernel.Devices[0].Flags & ExportDescription.FlagReadOnly);
        await running.StopAsync();
    }

    [Fact]
    public async Task IsStuck_KernelCallBlocksPastTimeoutPlusSlack_True()
    {
        using var release = new ManualResetEventSlim();
        _kernel.OnOperation = op =>
        {
            if (op == "set-sock")
            {
                release.Wait(TestTimeout);
            }
        };
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.ConfiguringKernel);

        _time.Advance(TimeSpan.FromSeconds(30) + MappingLoop.StopGrace + MappingLoop.StuckSlack);
        Assert.False(loop.IsStuck());
        _time.Advance(TimeSpan.FromSeconds(1));
        Assert.True(loop.IsStuck());

        release.Set();
        await running.WaitForAsync(MappingState.Serving);
        Assert.False(loop.IsStuck());
        await running.StopAsync();
    }

    /// <summary>A wall clock that an NTP step moves, while the monotonic clock (timestamps) goes on as before.</summary>
    private sealed class SteppedWallClock : Microsoft.Extensions.Time.Testing.FakeTimeProvider
    {
        public TimeSpan Step { get; set; }

        public override DateTimeOffset GetUtcNow() => base.GetUtcNow() + Step;

        // FakeTimeProvider derives its timestamps from GetUtcNow (ticks): take the step back out.
        public override long GetTimestamp() => base.GetTimestamp() - (Step.Ticks * TimestampFrequency / TimeSpan.TicksPerSecond);
    }

    [Fact]
    public async Task IsStuck_WallClockStepsForward_NotStuck()
    {
        // An NTP step at boot while a connect is in progress: the watchdog must not see a stuck loop (systemd would
        // kill a healthy daemon, skipping its clean stop).
        var clock = new SteppedWallClock();
        var connector = new FakeConnector().ThenHang();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, clock);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Connecting);

        clock.Step = TimeSpan.FromMinutes(10);

        Assert.False(loop.IsStuck());
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_ConfiguredDeviceInUseByAnotherClient_RefusedWithoutASingleIoctl()
    {
        // Another client's device (here netlink-connected): SET_BLKSIZE/SIZE/FLAGS/TIMEOUT have no owner check and would
        // resize it before SET_SOCK failed, and the NBD_CLEAR_SOCK of the cleanup would end its connection.
        _kernel.SysfsOnly[3] = new KernelDeviceInfo(3, 1UL << 30, 512, "someone-else", Connected: true, ReadOnly: false);
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);

        await running.WaitForAsync(MappingState.Reconnecting);

        Assert.Equal("/dev/nbd3 is in use by another client (backend 'someone-else', 1073741824 bytes): not touching it", loop.LastFailure);
        Assert.Empty(_kernel.Operations);
        Assert.All(connector.Sessions, s => Assert.True(s.Disposed));
        await running.StopAsync();
        Assert.Empty(_kernel.Operations);
    }

    [Fact]
    public async Task RunAsync_SetSocketRefused_DeviceClosedWithoutClearSock()
    {
        // Claimed by another client between the sysfs check and SET_SOCK: its connection must survive our cleanup.
        _kernel.SetSocketFailure = new Nbd.Kernel.NbdKernelException("/dev/nbd3", "NBD_SET_SOCK", 16);
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);

        await running.WaitForAsync(MappingState.Reconnecting);

        Assert.Equal(["open /dev/nbd3", "blksize 4096", "size 1073741824", "flags 257", "timeout 30", "set-sock refused", "close /dev/nbd3"], _kernel.Operations);
        await running.StopAsync();
        Assert.DoesNotContain("clear-sock", _kernel.Operations);
    }

    [Fact]
    public async Task RunAsync_UnusedDeviceTakenByAnotherClientBeforeSetSock_NextAttemptPicksAFreeOneAgain()
    {
        // The device the first attempt picked was claimed by another client first (SET_SOCK EBUSY): never ours, so the
        // next attempt looks for a free device again instead of configuring that one once more.
        _kernel.SetSocketFailure = new Nbd.Kernel.NbdKernelException("/dev/nbd7", "NBD_SET_SOCK", 16);
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Reconnecting);
        _kernel.SetSocketFailure = null;

        _time.Advance(loop.LastDelay!.Value);
        await running.WaitForAsync(MappingState.Serving);

        Assert.Equal(2, _kernel.Operations.Count(o => o == "open unused"));
        Assert.DoesNotContain("open /dev/nbd7", _kernel.Operations);
        await running.StopAsync();
    }

    /// <summary>Lets every backoff delay pass until the loop gives up, and waits for it to end.</summary>
    private async Task RetryUntilGaveUpAsync(MappingLoop loop, RunningLoop running)
    {
        for (int seen = 1; ; seen++)
        {
            await running.WaitForAsync(s => s.Count(x => x == MappingState.Reconnecting) >= seen || s.Contains(MappingState.GaveUp), $"Reconnecting #{seen} or GaveUp");
            if (running.States.Contains(MappingState.GaveUp))
            {
                break;
            }

            _time.Advance(loop.LastDelay!.Value);
        }

        await running.EndedAsync();
    }
}

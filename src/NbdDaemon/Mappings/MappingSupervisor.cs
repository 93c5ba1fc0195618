using NbdDaemon.Configuration;
using NbdDaemon.Mappings.Linux;
using NbdDaemon.Systemd;

namespace NbdDaemon.Mappings;

/// <summary>
/// Runs one <see cref="MappingLoop"/> per configured mapping, each as its own task, and owns what depends on
/// all of them together: readiness, the status line and watchdog health. One hosted service rather than one
/// BackgroundService per mapping because the host starts hosted services one after another and cannot
/// express "ready once every mapping has been tried"; isolation comes from the loops themselves
/// (<see cref="MappingLoop.RunAsync"/> never throws and shares nothing with other loops).
/// </summary>
internal sealed class MappingSupervisor : IHostedService, IDisposable
{
    private readonly MappingLoop[] _loops;
    private readonly TimeProvider _time;
    private readonly ILogger _logger;
    /// <summary>One per loop: cancelling one token runs its callbacks, and with them (inline) each loop's teardown.</summary>
    private readonly CancellationTokenSource[] _stopping;
    private readonly IFileDescriptorStore? _store;
    private Task[] _running = [];

    /// <summary>
    /// The longest the start waits for every mapping's first attempt (each bounded by its own Timeout, which has no
    /// upper limit): READY=1 must come before systemd's start timeout (TimeoutStartSec, 90 s by default), or the unit
    /// fails and Restart= starts it over, again and again while a server drops packets. Mappings still trying then go
    /// on in the background, as after any failed first attempt.
    /// </summary>
    public static readonly TimeSpan ReadyDeadline = TimeSpan.FromSeconds(60);

    public MappingSupervisor(
        IReadOnlyList<MappingOptions> mappings, INbdConnector connector, INbdKernel kernel, TimeProvider time, ILoggerFactory loggerFactory,
        Func<double>? unitRandom = null, IFileDescriptorStore? store = null)
    {
        _time = time;
        _store = store;
        _logger = loggerFactory.CreateLogger<MappingSupervisor>();
        ILogger loopLogger = loggerFactory.CreateLogger<MappingLoop>();
        var claims = new DeviceClaims(mappings);
        _loops = [.. mappings.Select(m => new MappingLoop(m, connector, kernel, time, loopLogger, unitRandom, claims))];
        _stopping = [.. _loops.Select(_ => new CancellationTokenSource())];
        WarnIfTheStoreIsTooSmall(mappings, store);
        WarnIfATimeoutIsShorterThanARestart(mappings, store);
        foreach (MappingLoop loop in _loops)
        {
            loop.StateChanged += (_, _) => StatusChanged?.Invoke();
            if (store is not null && RelayingConnector.ResumablePrefixes(loop.Options) is { Count: > 0 } prefixes)
            {
                loop.StateChanged += (_, state) => ReleaseHandedOver(state, prefixes);
            }
        }
    }

    /// <summary>
    /// Every relay connection of a netlink mapping keeps its journal in systemd's store, three descriptors each, for as
    /// long as it serves (whatever OnStop says: a crash is no stop); the store takes no more than FileDescriptorStoreMax=
    /// (systemd 254+ says it in $FDSTORE), and a connection without room keeps none: said once at start, not at the
    /// crash that finds out. (A connection that finds no room only logs it and runs without a journal.)
    /// </summary>
    private void WarnIfTheStoreIsTooSmall(IReadOnlyList<MappingOptions> mappings, IFileDescriptorStore? store)
    {
        int connections = mappings.Where(RelayingConnector.IsResumable).Sum(m => m.Connections);
        int descriptors = connections * RelayingConnector.JournalDescriptors;
        if (store is { CanStore: true, Capacity: int capacity } && descriptors > capacity)
        {
            SupervisorLog.StoreTooSmall(_logger, connections, descriptors, RelayingConnector.JournalDescriptors, capacity);
        }
    }

    /// <summary>
    /// A relay's journal carries the kernel's connection across a crash only if the requests in flight outlast the
    /// restart: the driver's timeout handler ends a connection whose request timed out (on a netlink device it marks the
    /// socket dead and shuts it down), and the next process then finds a dead connection in the journal's group.
    /// systemd does not tell a service its RestartSec=; the unit's 1 s plus a start of a few seconds (more under load or
    /// emulation) is what <see cref="CrashRestartAllowance"/> allows for.
    /// </summary>
    private void WarnIfATimeoutIsShorterThanARestart(IReadOnlyList<MappingOptions> mappings, IFileDescriptorStore? store)
    {
        if (store is not { CanStore: true })
        {
            return;
        }

        foreach (MappingOptions mapping in mappings.Where(m => RelayingConnector.IsResumable(m)
                     && m.Timeout > TimeSpan.Zero && m.Timeout < CrashRestartAllowance))
        {
            SupervisorLog.TimeoutShorterThanARestart(_logger, mapping.Name, mapping.Timeout.TotalSeconds, CrashRestartAllowance.TotalSeconds);
        }
    }

    /// <summary>The least request Timeout a relay mapping's crash restart is assumed to fit in (RestartSec=1 plus the start).</summary>
    public static readonly TimeSpan CrashRestartAllowance = TimeSpan.FromSeconds(10);

    /// <summary>Raised after any mapping changed state (from that mapping's flow).</summary>
    public event Action? StatusChanged;

    public IReadOnlyList<MappingLoop> Loops => _loops;

    /// <summary>The STATUS= text: "2 of 3 mappings serving; failing: data (connection refused)".</summary>
    public string StatusText => MappingStatus.Format(_loops);

    /// <summary>Healthy = no loop stuck in an active state (<see cref="MappingLoop.IsStuck"/>). Failing mappings are healthy.</summary>
    public bool IsHealthy() => !_loops.Any(l => l.IsStuck());

    /// <summary>
    /// Starts every loop, then returns once every mapping has been tried once (reached Serving or failed its
    /// first attempt). The host raises ApplicationStarted, and with it systemd READY=1, only after this returns.
    /// </summary>
    public async Task StartAsync(CancellationToken cancellationToken)
    {
        if (_loops.Length == 0)
        {
            // Most likely a misspelled section ("Nbdd:Mappings" is not read) or a config file in another place: a daemon
            // that maps nothing should say where mappings come from, not look like one that works.
            _logger.LogWarning("No mappings configured: nothing to map. Mappings are read from Nbd:Mappings in appsettings.json next to the executable, /etc/nbd-daemon/appsettings.json, the environment (Nbd__Mappings__0__Uri=…) and the command line (--Nbd:Mappings:0:Uri=…)");
        }

        // Relay ends handed over by the previous process for mappings that can no longer take them back (removed from the
        // configuration, no longer Relay or Netlink) would only hold kernel connections open that nobody reads. Those of
        // the other mappings stay until their mapping serves or fails (ReleaseHandedOver): a server down across the
        // restart must not cost the requests the kernel queued in them (they would wait for the hand-over timeout).
        string[] resumable = [.. _loops.SelectMany(l => RelayingConnector.ResumablePrefixes(l.Options))];
        _store?.ReleaseUnclaimed(name => !resumable.Any(p => name.StartsWith(p, StringComparison.Ordinal)));

        // Task.Run: a loop's synchronous parts (ioctls) must not run on the host's start-up flow.
        _running = [.. _loops.Select((l, i) => Task.Run(() => l.RunAsync(_stopping[i].Token), CancellationToken.None))];
        try
        {
            await Task.WhenAll(_loops.Select(l => l.FirstAttemptCompleted)).WaitAsync(ReadyDeadline, _time, cancellationToken);
        }
        catch (TimeoutException)
        {
            _logger.LogWarning("Not every mapping finished its first attempt within {Seconds} s; ready anyway, they go on trying: {Status}", ReadyDeadline.TotalSeconds, StatusText);
            return;
        }
        catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
        {
            // A stop (SIGTERM) before every mapping was tried once. Thrown from here it would fail the host's start, and
            // the host never stops what failed to start: the loops would go down with the process, devices left as
            // they were, exit code 1. Returning lets the host stop as usual, and StopAsync stop the loops.
            _logger.LogInformation("Stop requested before every mapping was tried once: {Status}", StatusText);
            return;
        }

        _logger.LogInformation("All {Count} mappings tried once: {Status}", _loops.Length, StatusText);
    }

    /// <summary>
    /// A mapping that serves has taken back every relay end it resumes on (what is left is surplus: fewer Connections
    /// than before); one that failed or gave up takes none. Either way its remaining ends are closed. A mapping still
    /// trying keeps them, and a stop leaves them in systemd's store for the next start.
    /// </summary>
    private void ReleaseHandedOver(MappingState state, IReadOnlyList<string> prefixes)
    {
        if (state is MappingState.Serving or MappingState.Failed or MappingState.GaveUp)
        {
            _store?.ReleaseUnclaimed(name => prefixes.Any(p => name.StartsWith(p, StringComparison.Ordinal)));
        }
    }

    public async Task StopAsync(CancellationToken cancellationToken)
    {
        // Each loop's stop on its own thread, and not awaited here: a cancellation runs the loop's teardown inline, and
        // a teardown can block in the kernel (NBD_CMD_DISCONNECT to a server that stopped reading, a relay hand-over
        // waiting for owed replies). One token for all would run them one after another, and the host's timeout
        // below would only start counting after the last. A thread of its own, not the pool's: with teardowns blocked
        // on pool threads the pool adds threads about two a second, and the 16th mapping's teardown would start
        // seconds late (a loaded test run once failed StopAsync_TeardownsThatBlock_*, most likely so).
        for (int i = 0; i < _stopping.Length; i++)
        {
            CancellationTokenSource stop = _stopping[i];
            new Thread(() => CancelQuietly(stop)) { IsBackground = true, Name = "nbd-stop " + _loops[i].Name }.Start();
        }

        try
        {
            await Task.WhenAll(_running).WaitAsync(cancellationToken);
        }
        catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
        {
            _logger.LogError("Shutdown timeout: mappings still stopping: {Mappings}",
                string.Join(", ", _loops.Where(l => l.State != MappingState.Stopped).Select(l => $"{l.Name} ({l.State})")));
        }
    }

    /// <summary>The host may dispose us after its stop timeout, before a slow pool thread got to the cancel.</summary>
    private static void CancelQuietly(CancellationTokenSource stop)
    {
        try
        {
            stop.Cancel();
        }
        catch (ObjectDisposedException)
        {
        }
    }

    public void Dispose()
    {
        foreach (CancellationTokenSource stop in _stopping)
        {
            stop.Dispose();
        }
    }
}

internal static partial class SupervisorLog
{
    [LoggerMessage(EventId = 131, Level = LogLevel.Warning, Message = "{Connections} relay connections keep their journals in systemd's file descriptor store ({Descriptors} descriptors, {Each} each), but it holds {Capacity} (FileDescriptorStoreMax=): those beyond it keep none, and a crash of the daemon ends their kernel connections (the driver resends after its Timeout); raise FileDescriptorStoreMax= in a drop-in")]
    public static partial void StoreTooSmall(ILogger logger, int connections, int descriptors, int each, int capacity);

    [LoggerMessage(EventId = 142, Level = LogLevel.Warning, Message = "Mapping {Mapping}: Timeout {TimeoutSeconds:0.###} s may be shorter than a crash restart of the daemon (the unit's RestartSec= plus the start; {AllowanceSeconds:0} s allowed for): the driver would end the relay's connection before the next process carries it on from its journal, and the requests in flight would wait for a new one; raise Timeout")]
    public static partial void TimeoutShorterThanARestart(ILogger logger, string mapping, double timeoutSeconds, double allowanceSeconds);
}

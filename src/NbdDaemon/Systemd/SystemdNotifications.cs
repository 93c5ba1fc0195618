using Microsoft.Extensions.Hosting.Systemd;
using NbdDaemon.Mappings;

namespace NbdDaemon.Systemd;

/// <summary>
/// Keeps STATUS= current and sends WATCHDOG=1. READY=1 and STOPPING=1 come from the stock SystemdLifetime
/// (READY on ApplicationStarted, which waits for <see cref="MappingSupervisor.StartAsync"/>); the stock
/// lifetime never sends WATCHDOG=1, so that is done here, and only while <see cref="MappingSupervisor.IsHealthy"/>:
/// a loop stuck in a kernel call stops the pings and systemd restarts the service after WatchdogSec.
/// Registered before the supervisor so pings also flow while the first attempts run.
/// </summary>
internal sealed class SystemdNotifications : BackgroundService
{
    private readonly ISystemdNotifier _notifier;
    private readonly MappingSupervisor _supervisor;
    private readonly TimeProvider _time;
    private readonly WatchdogSettings _watchdog;
    private readonly ILogger _logger;
    private readonly Lock _statusLock = new();
    private string? _lastStatus;
    private bool _reportedUnhealthy;
    private int _reportedSendFailure;

    /// <summary>
    /// systemd ignores a notification datagram longer than its buffer (NOTIFY_BUFFER_MAX, 4096 bytes): a STATUS= line
    /// listing many failing mappings is cut to this many characters (at most 4 UTF-8 bytes each), ending in "…".
    /// </summary>
    public const int MaxStatusChars = 1000;
    private PeriodicTimer? _timer;

    public SystemdNotifications(ISystemdNotifier notifier, MappingSupervisor supervisor, TimeProvider time, WatchdogSettings watchdog, ILogger<SystemdNotifications> logger)
    {
        _notifier = notifier;
        _supervisor = supervisor;
        _time = time;
        _watchdog = watchdog;
        _logger = logger;
    }

    public override Task StartAsync(CancellationToken cancellationToken)
    {
        _supervisor.StatusChanged += SendStatus;
        SendStatus();
        if (_watchdog.PingInterval is TimeSpan interval && _notifier.IsEnabled)
        {
            // First ping and the timer are set up here, not in ExecuteAsync: since .NET 10 ExecuteAsync runs
            // on a pool thread, and the ping schedule must not depend on when that thread gets to run.
            Tick();
            _timer = new PeriodicTimer(interval, _time);
        }

        return base.StartAsync(cancellationToken);
    }

    public override async Task StopAsync(CancellationToken cancellationToken)
    {
        _supervisor.StatusChanged -= SendStatus;
        await base.StopAsync(cancellationToken);
    }

    /// <summary>Sends STATUS= when the text differs from the last one sent.</summary>
    public void SendStatus()
    {
        if (!_notifier.IsEnabled)
        {
            return;
        }

        lock (_statusLock)
        {
            string status = _supervisor.StatusText;
            if (status == _lastStatus)
            {
                return;
            }

            if (TryNotify("STATUS=" + StatusLine(status)))
            {
                _lastStatus = status;
            }
        }
    }

    /// <summary>
    /// The STATUS= value for <paramref name="status"/>: one line (a newline would start a new assignment in the
    /// datagram), at most <see cref="MaxStatusChars"/> characters ending in "…" when cut, never half a surrogate pair.
    /// </summary>
    internal static string StatusLine(string status)
    {
        string line = status.ReplaceLineEndings(" ");
        return line.Length > MaxStatusChars ? FailureText.Prefix(line, MaxStatusChars - 1) + "…" : line;
    }

    /// <summary>
    /// Sends one notification; false when the socket refused it. The notifier throws then (NOTIFY_SOCKET gone, or a
    /// supervisor that stopped reading: <see cref="BoundedSystemdNotifier"/>), and this runs inside mapping transitions
    /// and watchdog ticks: an exception
    /// there would skip a mapping's teardown or stop the host. Logged once per series of failures.
    /// </summary>
    private bool TryNotify(string state)
    {
        try
        {
            _notifier.Notify(new ServiceState(state));
            Interlocked.Exchange(ref _reportedSendFailure, 0);
            return true;
        }
        catch (Exception ex) when (ex is System.Net.Sockets.SocketException or ObjectDisposedException or IOException)
        {
            if (Interlocked.Exchange(ref _reportedSendFailure, 1) == 0)
            {
                _logger.LogWarning(ex, "systemd notification not sent ({State}): NOTIFY_SOCKET refused it, or systemd read nothing for {LimitSeconds} s", state.Split('=')[0], BoundedSystemdNotifier.StatusSendLimit.TotalSeconds);
            }

            return false;
        }
    }

    /// <summary>One watchdog tick: WATCHDOG=1 if healthy. Returns whether it was sent.</summary>
    public bool Tick()
    {
        if (_supervisor.IsHealthy())
        {
            _reportedUnhealthy = false;
            return TryNotify("WATCHDOG=1");
        }

        if (!_reportedUnhealthy)
        {
            _reportedUnhealthy = true;
            _logger.LogError("Mapping loop stuck, withholding WATCHDOG=1: {Mappings}",
                string.Join(", ", _supervisor.Loops.Where(l => l.IsStuck()).Select(l => $"{l.Name} ({l.State})")));
        }

        return false;
    }

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        using PeriodicTimer? timer = _timer;
        if (timer is null)
        {
            return;
        }

        try
        {
            while (await timer.WaitForNextTickAsync(stoppingToken))
            {
                Tick();
            }
        }
        catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested)
        {
        }
    }
}

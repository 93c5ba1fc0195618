using System.Globalization;
using System.Net.Sockets;
using NbdDaemon.Configuration;

namespace NbdDaemon.Mappings;

/// <summary>
/// The life of one mapping, top to bottom:
/// <code>
///   Connecting → Negotiating → ConfiguringKernel → Serving
///        ↑            (any failure)                  │ connection lost
///        └──────────── Reconnecting (backoff) ←──────┘
///   stop request in any state → Stopping → Stopped
///   Reconnect disabled / MaxAttempts reached → GaveUp;  permanent failure or bug → Failed
/// </code>
/// Ioctl: after a lost connection the device is closed and the SAME path is opened and configured again.
/// Netlink: CONNECT once; after LINK_DEAD the new sockets go in through RECONFIGURE on the same index.
/// After the first successful negotiation the export must keep its size and writability
/// (<see cref="ExportChangedException"/>), otherwise the attempt fails and is retried with backoff.
/// </summary>
internal sealed class MappingLoop
{
    /// <summary>How long Stopping waits for the NBD_DO_IT thread to return after NBD_DISCONNECT.</summary>
    public static readonly TimeSpan StopGrace = TimeSpan.FromSeconds(5);

    /// <summary>Slack on top of the mapping's Timeout before an active state counts as stuck (watchdog).</summary>
    public static readonly TimeSpan StuckSlack = TimeSpan.FromSeconds(30);

    private readonly MappingOptions _options;
    private readonly INbdConnector _connector;
    private readonly INbdKernel _kernel;
    private readonly TimeProvider _time;
    private readonly ILogger _logger;
    private readonly ReconnectBackoff _backoff;
    private readonly TaskCompletionSource _firstAttempt = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly object _stateLock = new();

    private List<INbdSession> _sessions = [];
    private IIoctlDevice? _device;
    private INbdServiceLoop? _serviceLoop;
    private INbdNetlinkControl? _netlink;
    private int? _netlinkIndex;
    private bool _kernelHasSockets;
    private ExportDescription? _established;
    private MappingState _state = MappingState.Idle;
    private DateTimeOffset _stateEnteredAt;
    private string? _devicePath;
    private string? _lastFailure;
    private int _failedAttempts;

    public MappingLoop(MappingOptions options, INbdConnector connector, INbdKernel kernel, TimeProvider time, ILogger logger, Func<double>? unitRandom = null)
    {
        _options = options;
        _connector = connector;
        _kernel = kernel;
        _time = time;
        _logger = logger;
        _backoff = new ReconnectBackoff(options.Reconnect, unitRandom);
        _devicePath = options.Device;
        _stateEnteredAt = time.GetUtcNow();
    }

    /// <summary>Raised synchronously on the loop's own flow after each transition was logged.</summary>
    public event Action<MappingLoop, MappingState>? StateChanged;

    public MappingOptions Options => _options;

    public string Name => _options.Name;

    public MappingState State
    {
        get
        {
            lock (_stateLock)
            {
                return _state;
            }
        }
    }

    /// <summary>/dev/nbdN once known (configured, chosen by the kernel side, or null before the first configuration).</summary>
    public string? Device => Volatile.Read(ref _devicePath);

    /// <summary>Why the last attempt failed; null while serving.</summary>
    public string? LastFailure => Volatile.Read(ref _lastFailure);

    /// <summary>Consecutive failed attempts since the mapping last reached Serving.</summary>
    public int FailedAttempts => Volatile.Read(ref _failedAttempts);

    /// <summary>The backoff delay chosen when entering Reconnecting most recently.</summary>
    public TimeSpan? LastDelay { get; private set; }

    /// <summary>Completes once the first attempt has either reached Serving or failed (the "ready" contribution).</summary>
    public Task FirstAttemptCompleted => _firstAttempt.Task;

    /// <summary>
    /// True when the loop has sat in an active state (Connecting, Negotiating, ConfiguringKernel, Stopping) longer
    /// than those states are allowed to take: each is bounded by the mapping's Timeout or <see cref="StopGrace"/>,
    /// so exceeding Timeout + <see cref="StuckSlack"/> means a blocked kernel call or a lost continuation.
    /// Waiting states (Serving, Reconnecting, terminal) are waits by design and never stuck.
    /// </summary>
    public bool IsStuck(DateTimeOffset now)
    {
        lock (_stateLock)
        {
            bool active = _state is MappingState.Connecting or MappingState.Negotiating or MappingState.ConfiguringKernel or MappingState.Stopping;
            return active && now - _stateEnteredAt > _options.Timeout + StopGrace + StuckSlack;
        }
    }

    /// <summary>Runs until <paramref name="stop"/> fires (then tears down and returns) or the mapping gives up/fails. Never throws.</summary>
    public async Task RunAsync(CancellationToken stop)
    {
        try
        {
            await RunAttemptsAsync(stop);
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
            Transition(MappingState.Stopping);
            await ReleaseAsync();
            Transition(MappingState.Stopped);
        }
#pragma warning disable CA1031 // One mapping's bug must not take the others (or the host) down.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            MappingLog.LoopCrashed(_logger, ex, Name, DeviceText);
            Volatile.Write(ref _lastFailure, FailureText.Describe(ex));
            await ReleaseAsync();
            Transition(MappingState.Failed, ex, "; " + _lastFailure);
        }
        finally
        {
            _firstAttempt.TrySetResult();
        }
    }

    private async Task RunAttemptsAsync(CancellationToken stop)
    {
        while (true)
        {
            stop.ThrowIfCancellationRequested();
            Exception failure = await AttemptAsync(stop);
            string reason = FailureText.Describe(failure);
            Volatile.Write(ref _lastFailure, reason);
            if (FailureText.KindOf(failure) == FailureKind.Permanent)
            {
                await ReleaseAsync();
                Transition(MappingState.Failed, failure, $"; {reason} (not retried)");
                _firstAttempt.TrySetResult();
                return;
            }

            int attempts = Interlocked.Increment(ref _failedAttempts);
            ReconnectOptions policy = _options.Reconnect;
            if (!policy.Enabled || (policy.MaxAttempts > 0 && attempts >= policy.MaxAttempts))
            {
                await ReleaseAsync();
                string why = policy.Enabled ? $"after {attempts} failed attempts" : "reconnect disabled";
                Transition(MappingState.GaveUp, failure, $"; {reason} ({why})");
                _firstAttempt.TrySetResult();
                return;
            }

            TimeSpan delay = _backoff.NextDelay(attempts);
            LastDelay = delay;
            // The timer starts before the transition is announced, so whoever reacts to Reconnecting
            // (a test advancing a fake clock) cannot get ahead of it.
            Task wait = Task.Delay(delay, _time, stop);
            // The stack trace goes to the journal with the first failure of a series only; a server that stays
            // down for an hour would otherwise repeat it every MaxDelay.
            Transition(MappingState.Reconnecting, attempts == 1 ? failure : null, string.Create(CultureInfo.InvariantCulture, $"; {reason}; attempt {attempts + 1} in {delay.TotalSeconds:0.###} s"));
            _firstAttempt.TrySetResult();
            await wait;
        }
    }

    /// <summary>One attempt; returns why serving (or the attempt) ended. Throws only for the stop request.</summary>
    private async Task<Exception> AttemptAsync(CancellationToken stop)
    {
        try
        {
            Transition(MappingState.Connecting);
            _sessions = await ConnectAllAsync(stop);
            stop.ThrowIfCancellationRequested();

            Transition(MappingState.Negotiating);
            (ExportDescription export, uint blockSize, ushort flags) = Negotiate();
            stop.ThrowIfCancellationRequested();

            Transition(MappingState.ConfiguringKernel);
            if (_options.Interface == KernelInterface.Ioctl)
            {
                ConfigureIoctl(export, blockSize, flags);
            }
            else
            {
                ConfigureNetlink(export, blockSize, flags);
            }

            stop.ThrowIfCancellationRequested();
            Volatile.Write(ref _failedAttempts, 0);
            Volatile.Write(ref _lastFailure, null);
            Transition(MappingState.Serving);
            _firstAttempt.TrySetResult();
            return await ServeAsync(stop);
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
            throw;
        }
#pragma warning disable CA1031 // Every failure of an attempt is classified by type and retried or not.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            ReleaseConnection();
            return ex;
        }
    }

    private async Task<List<INbdSession>> ConnectAllAsync(CancellationToken stop)
    {
        // The whole connect + handshake of all connections shares one deadline: the mapping's Timeout.
        using var deadline = new CancellationTokenSource(_options.Timeout, _time);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(stop, deadline.Token);
        var sessions = new List<INbdSession>(_options.Connections);
        try
        {
            for (int i = 0; i < _options.Connections; i++)
            {
                sessions.Add(await _connector.ConnectAsync(_options, linked.Token));
            }

            return sessions;
        }
        catch (OperationCanceledException ex) when (!stop.IsCancellationRequested && deadline.IsCancellationRequested)
        {
            DisposeAll(sessions);
            throw new MappingException(string.Create(CultureInfo.InvariantCulture, $"connect timed out after {_options.Timeout.TotalSeconds:0.###} s"), FailureKind.Transient, ex);
        }
        catch
        {
            DisposeAll(sessions);
            throw;
        }
    }

    private (ExportDescription Export, uint BlockSize, ushort Flags) Negotiate()
    {
        ExportDescription export = _sessions[0].Export;
        foreach (INbdSession other in _sessions)
        {
            if (other.Export.Size != export.Size || other.Export.TransmissionFlags != export.TransmissionFlags)
            {
                throw new MappingException("connections disagree about the export (size or flags)");
            }
        }

        if (_sessions.Count > 1 && (export.TransmissionFlags & ExportDescription.FlagCanMultiConn) == 0)
        {
            throw new MappingException($"server does not allow {_sessions.Count} connections (no NBD_FLAG_CAN_MULTI_CONN); set Connections=1", FailureKind.Permanent);
        }

        if (_established is { } before)
        {
            if (export.Size != before.Size)
            {
                throw new ExportChangedException($"export size changed from {before.Size} to {export.Size} bytes", before, export);
            }

            if (export.ReadOnly && !before.ReadOnly && !_options.ReadOnly)
            {
                throw new ExportChangedException("export became read-only", before, export);
            }
        }

        uint blockSize = BlockSizePolicy.Choose(_options.BlockSize, export.PreferredBlockSize);
        if (export.MinimumBlockSize is uint minimum && minimum > blockSize)
        {
            throw new MappingException($"server minimum block size {minimum} exceeds block size {blockSize}");
        }

        _established ??= export;
        ushort flags = (ushort)(export.TransmissionFlags | (_options.ReadOnly ? ExportDescription.FlagReadOnly : 0));
        return (export, blockSize, flags);
    }

    private void ConfigureIoctl(ExportDescription export, uint blockSize, ushort flags)
    {
        // After a reconnect the same /dev/nbdN comes back (the path chosen first), which is what mounts rely on.
        if (_device is null)
        {
            _device = _kernel.OpenDevice(Device);
            Volatile.Write(ref _devicePath, _device.Path);
        }

        _kernelHasSockets = true;
        _device.SetBlockSize(blockSize);
        _device.SetSizeBytes(export.Size);
        _device.SetFlags(flags);
        _device.SetTimeout(_options.Timeout);
        foreach (INbdSession session in _sessions)
        {
            _device.SetSocket(session.Socket);
        }

        _serviceLoop = _device.StartServiceLoop(Name);
    }

    private void ConfigureNetlink(ExportDescription export, uint blockSize, ushort flags)
    {
        _netlink ??= _kernel.OpenNetlink();
        Socket[] sockets = [.. _sessions.Select(s => s.Socket)];
        if (_netlinkIndex is int index)
        {
            try
            {
                _netlink.Reconfigure(index, sockets);
                return;
            }
#pragma warning disable CA1031 // The kernel may have dropped the device after DeadConnectionTimeout: connect it again.
            catch (Exception ex)
#pragma warning restore CA1031
            {
                MappingLog.ReconfigureFailed(_logger, ex, Name, DeviceText);
            }
        }

        int? wanted = _netlinkIndex ?? DeviceIndex(_options.Device);
        int connected = _netlink.Connect(new NetlinkConnectParameters(
            wanted, export.Size, blockSize, _options.Timeout, _options.DeadConnectionTimeout, flags, sockets, _options.BackendIdentifier));
        _netlinkIndex = connected;
        Volatile.Write(ref _devicePath, "/dev/nbd" + connected.ToString(CultureInfo.InvariantCulture));
    }

    private async Task<Exception> ServeAsync(CancellationToken stop)
    {
        if (_options.Interface == KernelInterface.Ioctl)
        {
            INbdServiceLoop loop = _serviceLoop!;
            try
            {
                await loop.Completion.WaitAsync(stop);
            }
            catch (OperationCanceledException) when (stop.IsCancellationRequested)
            {
                throw;
            }
#pragma warning disable CA1031 // A faulted service loop is a lost connection like any other.
            catch (Exception ex)
#pragma warning restore CA1031
            {
                _serviceLoop = null;
                ReleaseConnection();
                return new MappingException("service loop failed: " + FailureText.Describe(ex), FailureKind.Transient, ex);
            }

            _serviceLoop = null;
            ReleaseConnection();
            return new MappingException("connection lost (service loop ended)");
        }

        await _netlink!.WaitForLinkDeadAsync(_netlinkIndex!.Value, stop);
        ReleaseConnection();
        return new MappingException("connection lost (LINK_DEAD)");
    }

    /// <summary>
    /// After a lost connection (ioctl): clear queue and socket, then close the device; the next attempt opens the same
    /// path again. Closing is what makes a reconnect possible at all: NBD_CLEAR_SOCK only shuts the dead socket down,
    /// it stays in the device's configuration (marked disconnected) until the last opener closes the device, and a
    /// NBD_DO_IT on a configuration that still holds it returns at once (seen on the 6.1 driver: Serving → "service
    /// loop ended" in a loop, device size 0). nbd-client's persist mode closes and reopens the device the same way.
    /// </summary>
    private void ReleaseConnection()
    {
        if (_options.Interface == KernelInterface.Ioctl && _device is not null && _serviceLoop is null && _kernelHasSockets)
        {
            TryStep("NBD_CLEAR_QUE", _device.ClearQueue);
            TryStep("NBD_CLEAR_SOCK", _device.ClearSocket);
            TryStep("close device", _device.Dispose);
            _device = null;
            _kernelHasSockets = false;
        }

        DisposeAll(_sessions);
        _sessions = [];
    }

    /// <summary>Stopping, GaveUp and Failed: clear queue, disconnect, clear socket, release everything. Never throws.</summary>
    private async Task ReleaseAsync()
    {
        if (_device is { } device)
        {
            if (_serviceLoop is { } loop)
            {
                TryStep("NBD_CLEAR_QUE", device.ClearQueue);
                TryStep("NBD_DISCONNECT", device.Disconnect);
                TryStep("service loop stop", loop.Stop);
                try
                {
                    await loop.Completion.WaitAsync(StopGrace, _time);
                }
#pragma warning disable CA1031 // Teardown continues whatever the loop ended with.
                catch (Exception ex)
#pragma warning restore CA1031
                {
                    MappingLog.ReleaseStepFailed(_logger, ex, Name, DeviceText, "waiting for NBD_DO_IT to return");
                }

                _serviceLoop = null;
            }

            TryStep("NBD_CLEAR_SOCK", device.ClearSocket);
            TryStep("close device", device.Dispose);
            _device = null;
        }

        if (_netlink is { } netlink)
        {
            if (_netlinkIndex is int index)
            {
                TryStep("NBD_CMD_DISCONNECT", () => netlink.Disconnect(index));
                _netlinkIndex = null;
            }

            TryStep("close netlink", netlink.Dispose);
            _netlink = null;
        }

        DisposeAll(_sessions);
        _sessions = [];
    }

    private void TryStep(string operation, Action step)
    {
        try
        {
            step();
        }
#pragma warning disable CA1031 // Teardown must run every step; failures are logged with the operation.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            MappingLog.ReleaseStepFailed(_logger, ex, Name, DeviceText, operation);
        }
    }

    private static void DisposeAll(List<INbdSession> sessions)
    {
        foreach (INbdSession session in sessions)
        {
            session.Dispose();
        }
    }

    private static int? DeviceIndex(string? device) =>
        device is null ? null : int.Parse(device.AsSpan("/dev/nbd".Length), NumberStyles.None, CultureInfo.InvariantCulture);

    private string DeviceText => Device ?? "(unassigned)";

    private void Transition(MappingState next, Exception? exception = null, string detail = "")
    {
        MappingState previous;
        lock (_stateLock)
        {
            previous = _state;
            _state = next;
            _stateEnteredAt = _time.GetUtcNow();
        }

        LogLevel level = next is MappingState.Reconnecting or MappingState.GaveUp or MappingState.Failed ? LogLevel.Warning : LogLevel.Information;
        MappingLog.Transition(_logger, level, exception, Name, DeviceText, _options.Endpoint.Server, _options.Endpoint.Export, previous, next, detail);
        StateChanged?.Invoke(this, next);
    }
}

using System.Globalization;
using System.Numerics;
using Nbd.Protocol;
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
/// Netlink: CONNECT once; after LINK_DEAD the new sockets go in through RECONFIGURE on the same index. While the
/// kernel holds the device's I/O (DeadConnectionTimeout after the loss) the loop retries at once and then every
/// <see cref="HeldRetryInterval"/> instead of backing off: every second waited there is a second of stalled I/O.
/// Before the first CONNECT a device left configured by an earlier daemon (same backend identifier) is adopted.
/// After the first successful configuration the export must keep its size, writability and the flags the driver uses
/// (<see cref="ExportChangedException"/>), otherwise the attempt fails and is retried with backoff.
/// </summary>
internal sealed class MappingLoop
{
    /// <summary>How long Stopping waits for the NBD_DO_IT thread to return after NBD_DISCONNECT.</summary>
    public static readonly TimeSpan StopGrace = TimeSpan.FromSeconds(5);

    /// <summary>Slack on top of the mapping's Timeout before an active state counts as stuck (watchdog).</summary>
    public static readonly TimeSpan StuckSlack = TimeSpan.FromSeconds(30);

    /// <summary>Netlink: retry interval (±20 % jitter) while the kernel holds I/O after LINK_DEAD.</summary>
    public static readonly TimeSpan HeldRetryInterval = TimeSpan.FromMilliseconds(250);

    /// <summary>
    /// A connection that served for less than this before it was lost is a quick loss: from the second in a row, the
    /// next attempt waits the normal backoff (as for a failed attempt) instead of starting at once. A server that
    /// completes the handshake and then drops the connection would otherwise be reconnected to in a tight loop.
    /// </summary>
    public static readonly TimeSpan StableServing = TimeSpan.FromSeconds(1);

    /// <summary>
    /// RECONFIGURE only fills slots the kernel already marked dead; a slot whose socket we just shut down may be
    /// marked a moment later. Sockets not taken are offered again this many times, <see cref="HeldRetryInterval"/> apart.
    /// </summary>
    public const int ReconfigureRetries = 4;

    /// <summary>
    /// The request timeout a device gets while its relays are handed over to the next process (a restart): requests the
    /// kernel starts then wait in the socket until the new process resumes, and must not time out meanwhile (the driver
    /// would declare the connection dead). The adopting process sets the mapping's Timeout again.
    /// </summary>
    public static readonly TimeSpan HandOverTimeout = TimeSpan.FromSeconds(60);

    /// <summary>How long after a LINK_DEAD one of the current sockets must show its end for the event to count.</summary>
    public static readonly TimeSpan LinkDeadGrace = TimeSpan.FromMilliseconds(500);

    private readonly MappingOptions _options;
    private readonly INbdConnector _connector;
    private readonly INbdKernel _kernel;
    private readonly TimeProvider _time;
    private readonly ILogger _logger;
    private readonly ReconnectBackoff _backoff;
    private readonly Func<double> _unitRandom;
    private readonly DeviceClaims _claims;
    private readonly TaskCompletionSource _firstAttempt = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly object _stateLock = new();

    private List<INbdSession> _sessions = [];
    private IIoctlDevice? _device;
    private INbdServiceLoop? _serviceLoop;
    private INbdNetlinkControl? _netlink;
    private int? _netlinkIndex;
    private bool _kernelHasSockets;

    /// <summary>Netlink while serving: the watch over the current sockets, replaced when a dead slot is filled (<see cref="TopUpAsync"/>).</summary>
    private ISocketWatch? _currentWatch;

    /// <summary>A top-up found no dead slot: not tried again until the connection is replaced.</summary>
    private bool _noSlotToFill;

    /// <summary>
    /// Devices we picked (<see cref="PickNetlinkDevice"/>) whose CONNECT failed EBUSY: open in some process without a
    /// configuration, which sysfs does not show (the driver gives an unconfigured device a configuration on open). The
    /// kernel's own pick skips such a device, so ours does too, instead of trying the same one at every attempt.
    /// </summary>
    private readonly HashSet<int> _busyPicks = [];

    /// <summary>The host-wide lock of this mapping (<see cref="INbdKernel.LockMapping"/>), taken by the first attempt that gets it.</summary>
    private IDisposable? _lock;

    /// <summary>The ioctl device took one of our sockets once: from then on it is this mapping's (see RefuseDeviceInUse).</summary>
    private bool _deviceClaimed;

    /// <summary>Whether the server's maximum request size could not be applied, and that was said once already.</summary>
    private bool _requestSizeWarned;

    /// <summary>Devices whose queue/max_sectors_kb this loop lowered: what it found there, and what it wrote.</summary>
    private readonly Dictionary<int, (uint Before, uint After)> _loweredRequestSizes = [];
    private ExportDescription? _established;
    private MappingState _state = MappingState.Idle;
    // Monotonic timestamps (TimeProvider.GetTimestamp), never the wall clock: an NTP step at boot must neither make a
    // healthy loop look stuck (the watchdog would have systemd kill the daemon) nor end the held retries early.
    private long _stateEnteredAt;
    private string? _devicePath;
    private string? _lastFailure;
    private int _failedAttempts;
    private long? _heldSince;
    private int _heldAttempts;

    /// <summary>The lost connection that started this run of attempts (ioctl; netlink's counts as held): not a failed attempt.</summary>
    private int _lostAttempts;
    private string? _lastLoggedReason;
    private bool _quietAttempt;
    private long? _servingSince;
    private int _quickLosses;

    /// <summary>A loop for one mapping; <paramref name="claims"/> is the daemon's devices by mapping (<see cref="DeviceClaims"/>), none for a mapping run alone.</summary>
    public MappingLoop(
        MappingOptions options, INbdConnector connector, INbdKernel kernel, TimeProvider time, ILogger logger, Func<double>? unitRandom = null,
        DeviceClaims? claims = null)
    {
        _claims = claims ?? DeviceClaims.For(options);
        _options = options;
        _connector = connector;
        _kernel = kernel;
        _time = time;
        _logger = logger;
        _unitRandom = unitRandom ?? Random.Shared.NextDouble;
        _backoff = new ReconnectBackoff(options.Reconnect, _unitRandom);
        _devicePath = options.Device;
        _stateEnteredAt = time.GetTimestamp();
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
    public bool IsStuck()
    {
        lock (_stateLock)
        {
            bool active = _state is MappingState.Connecting or MappingState.Negotiating or MappingState.ConfiguringKernel or MappingState.Stopping;
            return active && _time.GetElapsedTime(_stateEnteredAt) > _options.Timeout + StopGrace + StuckSlack;
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
            await ReleaseAsync(stopRequested: true);
            Transition(MappingState.Stopped);
        }
#pragma warning disable CA1031 // One mapping's bug must not take the others (or the host) down.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            MappingLog.LoopCrashed(_logger, ex, Name, DeviceText);
            Volatile.Write(ref _lastFailure, FailureText.Describe(ex));
            await ReleaseAsync(stopRequested: false);
            Transition(MappingState.Failed, ex, "; " + _lastFailure);
        }
        finally
        {
            _firstAttempt.TrySetResult();
            _claims.Release(Name);
            _lock?.Dispose();
            _lock = null;
        }
    }

    private async Task RunAttemptsAsync(CancellationToken stop)
    {
        // A device left configured by an earlier daemon may have lost its connection while no daemon ran: the
        // kernel is then holding its I/O already, so the start retries on the fast schedule too.
        if (_options.Interface == KernelInterface.Netlink)
        {
            if (LeftOverDeviceExists())
            {
                _heldSince = _time.GetTimestamp();
            }

            // Subscribed before the first connect: opening the family and joining the multicast group is not free
            // (seconds under emulation), and it would otherwise sit between the server's return and the hand-over.
            TryOpenNetlink();
        }

        while (true)
        {
            stop.ThrowIfCancellationRequested();
            Exception failure = await AttemptAsync(stop);
            // A stop that came meanwhile is a stop: not Failed or GaveUp, which would disconnect an OnStop: Leave device.
            stop.ThrowIfCancellationRequested();
            string reason = FailureText.Describe(failure);
            Volatile.Write(ref _lastFailure, reason);
            if (FailureText.KindOf(failure) == FailureKind.Permanent)
            {
                await ReleaseAsync(stopRequested: false);
                Transition(MappingState.Failed, failure, $"; {reason} (not retried)");
                _firstAttempt.TrySetResult();
                return;
            }

            int attempts = Interlocked.Increment(ref _failedAttempts);
            // While the kernel holds the I/O, retries are fast and do not count towards MaxAttempts: giving up
            // would fail that I/O, and waiting longer only stalls it longer. A changed export, or a mapping another
            // process runs, is no connection problem: it keeps the normal schedule.
            bool held = IsHeld() && failure is not (ExportChangedException or DeviceMismatchException or MappingInUseException);
            // A connection lost after serving is what reconnecting is for, not a failed attempt: MaxAttempts 1 still
            // reconnects once (it gave up at the loss itself).
            bool lost = _servingSince is not null;
            if (held)
            {
                _heldAttempts++;
            }
            else if (lost)
            {
                _lostAttempts++;
            }

            int counted = Math.Max(1, attempts - _heldAttempts);
            int failedReconnects = attempts - _heldAttempts - _lostAttempts;
            ReconnectOptions policy = _options.Reconnect;
            if (!policy.Enabled || (!held && !lost && policy.MaxAttempts > 0 && failedReconnects >= policy.MaxAttempts))
            {
                await ReleaseAsync(stopRequested: false);
                string why = !policy.Enabled ? "reconnect disabled"
                    : _heldAttempts > 0 ? $"after {failedReconnects} failed attempts, and {_heldAttempts} fast ones before while the kernel held the device's I/O"
                    : $"after {failedReconnects} failed attempts";
                Transition(MappingState.GaveUp, failure, $"; {reason} ({why})");
                _firstAttempt.TrySetResult();
                return;
            }

            TimeSpan delay = !held ? _backoff.NextDelay(counted)
                : failure is LinkLostException ? TimeSpan.Zero
                : HeldRetryDelay();
            if (_servingSince is long servedFrom)
            {
                _servingSince = null;
                _quickLosses = _time.GetElapsedTime(servedFrom) < StableServing ? _quickLosses + 1 : 0;
            }

            if (_quickLosses >= 2)
            {
                delay = TimeSpan.FromTicks(Math.Max(delay.Ticks, _backoff.NextDelay(_quickLosses - 1).Ticks));
            }

            LastDelay = delay;
            // The timer starts before the transition is announced, so whoever reacts to Reconnecting
            // (a test advancing a fake clock) cannot get ahead of it.
            Task wait = Task.Delay(delay, _time, stop);
            // A server that stays down would otherwise fill the journal (4 lines a second while the kernel holds
            // I/O): the same reason again is logged at attempts 1, 2, 4, 8, …, the others at Debug; a new reason
            // always. The stack trace goes with the first failure of a series only.
            bool loud = reason != _lastLoggedReason || BitOperations.IsPow2(attempts);
            _quietAttempt = !loud;
            if (loud)
            {
                _lastLoggedReason = reason;
            }

            Transition(MappingState.Reconnecting, attempts == 1 ? failure : null, string.Create(CultureInfo.InvariantCulture, $"; {reason}; attempt {attempts + 1} in {delay.TotalSeconds:0.###} s"), quiet: !loud);
            _firstAttempt.TrySetResult();
            await wait;
        }
    }

    /// <summary>Netlink after LINK_DEAD: true while the kernel still holds the device's I/O for a reconnect.</summary>
    private bool IsHeld() =>
        _heldSince is long since && _options.DeadConnectionTimeout is TimeSpan dead && _time.GetElapsedTime(since) < dead;

    private TimeSpan HeldRetryDelay() => TimeSpan.FromTicks((long)(HeldRetryInterval.Ticks * (0.8 + (0.4 * Math.Clamp(_unitRandom(), 0.0, 1.0)))));

    /// <summary>One attempt; returns why serving (or the attempt) ended. Throws only for the stop request.</summary>
    private async Task<Exception> AttemptAsync(CancellationToken stop)
    {
        try
        {
            Transition(MappingState.Connecting, quiet: _quietAttempt);
            // Before the server or the device is touched: another process running this mapping (a daemon started by
            // hand beside the service) owns both, and an adoption here would let our stop disconnect its device.
            _lock ??= _kernel.LockMapping(_options.BackendIdentifier);
            _sessions = await ConnectAllAsync(_options.Connections, stop);
            stop.ThrowIfCancellationRequested();

            Transition(MappingState.Negotiating, quiet: _quietAttempt);
            (ExportDescription export, uint blockSize, ushort flags) = Negotiate();
            stop.ThrowIfCancellationRequested();

            Transition(MappingState.ConfiguringKernel, quiet: _quietAttempt);
            if (_options.Interface == KernelInterface.Ioctl)
            {
                ConfigureIoctl(export, blockSize, flags);
            }
            else
            {
                await ConfigureNetlinkAsync(export, blockSize, flags, stop);
                LimitRequestSize(_netlinkIndex!.Value, export);
            }

            // Only what the kernel actually has becomes the reference for later reconnects: an export refused
            // on adoption must not become "the" export.
            _established ??= export;
            stop.ThrowIfCancellationRequested();
            Volatile.Write(ref _failedAttempts, 0);
            Volatile.Write(ref _lastFailure, null);
            _heldSince = null;
            _heldAttempts = 0;
            _lostAttempts = 0;
            _lastLoggedReason = null;
            _quietAttempt = false;
            foreach (INbdSession session in _sessions)
            {
                session.Serves(DeviceText);
            }

            _servingSince = _time.GetTimestamp();
            Transition(MappingState.Serving, detail: ServingDetail(export, blockSize));
            _firstAttempt.TrySetResult();
            return await ServeAsync(stop);
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
            throw;
        }
        catch (Exception ex) when (stop.IsCancellationRequested)
        {
            // Whatever failed while the stop was already under way (a lost event subscription, a connection the stop
            // itself ended): the stop's teardown decides, which with OnStop: Leave hands relay connections over instead
            // of closing them here.
            throw new OperationCanceledException("stopped", ex, stop);
        }
#pragma warning disable CA1031 // Every failure of an attempt is classified by type and retried or not.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            ReleaseConnection();
            return ex;
        }
    }

    /// <summary><paramref name="count"/> connections, handshake done; none left open when it fails.</summary>
    private async Task<List<INbdSession>> ConnectAllAsync(int count, CancellationToken stop)
    {
        // The whole connect + handshake of all connections shares one deadline: the mapping's Timeout.
        using var deadline = new CancellationTokenSource(_options.Timeout, _time);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(stop, deadline.Token);
        var sessions = new List<INbdSession>(count);
        try
        {
            for (int i = 0; i < count; i++)
            {
                sessions.Add(await _connector.ConnectAsync(_options, linked.Token));
            }

            return sessions;
        }
        catch (OperationCanceledException ex) when (!stop.IsCancellationRequested && deadline.IsCancellationRequested)
        {
            DisposeAll(sessions);
            // The words tell "connected, but no NBD greeting" (a port where no NBD server listens, a hung server) from a
            // later stall; without them (the connect itself) the text stays the plain deadline.
            string what = ex is Nbd.Protocol.NbdHandshakeCanceledException h
                ? h.NoGreeting ? ": " + FailureText.NoGreeting
                    : h.Awaiting is string awaited ? ": the handshake was waiting for " + awaited : ""
                : "";
            throw new MappingException(string.Create(CultureInfo.InvariantCulture, $"connect and handshake not done within {_options.Timeout.TotalSeconds:0.###} s (the mapping's Timeout){what}"), FailureKind.Transient, ex);
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

        if (_established is { } before && ExportChangedException.Compare(before, export, _options.ReadOnly) is { } changed)
        {
            throw changed;
        }

        uint blockSize = BlockSizePolicy.Choose(_options.BlockSize, export.PreferredBlockSize);
        if (BlockSizePolicy.Conflict(_options.BlockSize, blockSize, export.MinimumBlockSize, export.MaximumPayload, "BlockSize") is string conflict)
        {
            throw new MappingException(conflict);
        }

        if (export.Size < blockSize)
        {
            // The device is the export rounded down to whole blocks (the driver's capacity has no partial block): nothing.
            throw new MappingException($"export is {export.Size} bytes, less than one block of {blockSize} bytes: nothing to map");
        }

        ushort flags = (ushort)(export.TransmissionFlags | (_options.ReadOnly ? ExportDescription.FlagReadOnly : 0));
        return (export, blockSize, flags);
    }

    /// <summary>The export in whole blocks: the driver's capacity has no partial block, and reads of one would fail.</summary>
    private static ulong DeviceSize(ExportDescription export, uint blockSize) => Nbd.Kernel.NbdDevice.WholeBlocks(export.Size, blockSize);

    private void ConfigureIoctl(ExportDescription export, uint blockSize, ushort flags)
    {
        // After a reconnect the same /dev/nbdN comes back (the path chosen first), which is what mounts rely on.
        if (_device is null)
        {
            if (!_deviceClaimed && _options.Device is null)
            {
                // An unused device picked by an attempt that never got a socket into it is not ours: pick afresh.
                Volatile.Write(ref _devicePath, null);
                _claims.Release(Name);
            }
            else if (!_deviceClaimed)
            {
                RefuseDeviceInUse();
            }
            else
            {
                RefuseHeldConfiguration();
            }

            if (Device is { } path)
            {
                _device = _kernel.OpenDevice(path);
            }
            else
            {
                // Not a device another mapping names or one of ours is setting up: asked before each candidate is opened.
                try
                {
                    _device = _kernel.OpenDevice(null, index => _claims.TryClaim(index, Name));
                }
                finally
                {
                    _claims.Release(Name, keep: DeviceClaims.IndexOf(_device?.Path));
                }
            }

            Volatile.Write(ref _devicePath, _device.Path);
        }

        _device.SetBlockSize(blockSize);
        _device.SetSizeBytes(DeviceSize(export, blockSize));
        _device.SetFlags(flags);
        _device.SetTimeout(_options.Timeout);
        if (DeviceClaims.IndexOf(_device.Path) is int index)
        {
            LimitRequestSize(index, export);
        }

        foreach (INbdSession session in _sessions)
        {
            _device.SetSocket(session.Socket);
            // Only a device that took one of our sockets is ours to clear: NBD_CLEAR_SOCK on another client's device
            // (a SET_SOCK refused with EBUSY) would end its connection.
            _kernelHasSockets = true;
            _deviceClaimed = true;
        }

        _serviceLoop = _device.StartServiceLoop(Name);
    }

    private async Task ConfigureNetlinkAsync(ExportDescription export, uint blockSize, ushort flags, CancellationToken stop)
    {
        RenewBrokenNetlink();
        _netlink ??= _kernel.OpenNetlink();
        // SO_SNDTIMEO is how we learn which sockets the kernel took (it sets it to Timeout on each); the
        // handshake may have used it for its own deadline.
        foreach (INbdSession session in _sessions)
        {
            _kernel.ClearSendTimeout(session.Socket);
        }

        if (_netlinkIndex is null && FindOwnDevice() is { } leftOver)
        {
            Adopt(leftOver, export);
            return;
        }

        if (_sessions.Any(s => s.Resumed))
        {
            // Its other end belongs to a kernel connection of no device of ours: nothing to carry on. Shut down, it is
            // closed with the session (an end merely not used by an attempt would go back to the store for the next).
            foreach (INbdSession resumed in _sessions.Where(s => s.Resumed))
            {
                resumed.Shutdown();
            }

            throw new MappingException($"a relay connection handed over by the previous process, but no device is left configured for backend {_options.BackendIdentifier}; starting with a new connection");
        }

        if (_netlinkIndex is int kept && AnotherClients(kept) is { } now)
        {
            // The kernel gave the device up during the outage (DeadConnectionTimeout) and another client connected it.
            // RECONFIGURE compares the backend only when that client gave one: without, our sockets would fill its dead
            // slots and its reads would come from our server. Not ours any more: connect a device afresh.
            MappingLog.TakenByAnother(_logger, Name, Nbd.Kernel.NbdKernel.DevicePath(kept), now.Backend ?? "none");
            _loweredRequestSizes.Remove(kept); // its limit is theirs to keep now
            _netlinkIndex = null;
            _claims.Release(Name);
            Volatile.Write(ref _devicePath, _options.Device);
        }

        if (_netlinkIndex is int index)
        {
            bool reconfigured;
            try
            {
                _netlink.Reconfigure(index, [.. _sessions.Select(s => s.Socket)], _options.BackendIdentifier);
                reconfigured = true;
            }
#pragma warning disable CA1031 // The kernel may have dropped the device after DeadConnectionTimeout: connect it again.
            catch (Exception ex)
#pragma warning restore CA1031
            {
                MappingLog.ReconfigureFailed(_logger, ex, Name, DeviceText);
                reconfigured = false;
            }

            if (reconfigured)
            {
                await ConfirmReconfigureAsync(index, stop);
                return;
            }
        }

        int? wanted = _netlinkIndex ?? DeviceClaims.IndexOf(_options.Device);
        int? picked = wanted is null ? PickNetlinkDevice() : null;
        wanted ??= picked;
        // Before CONNECT as well as after: the driver starts the device at CONNECT, and udev's probe, readahead or a
        // partition scan may send a request of the driver's size before the limit written afterwards applies. Not on a
        // device another client has set up: CONNECT will refuse it (EBUSY), and its limit is not ours to change.
        bool limitedBefore = false;
        if (wanted is int target && _kernel.ReadDevice(target) is not { InUse: true })
        {
            limitedBefore = !_loweredRequestSizes.ContainsKey(target);
            LimitRequestSize(target, export, quiet: true);
        }

        int connected;
        try
        {
            connected = _netlink.Connect(new NetlinkConnectParameters(
                wanted, DeviceSize(export, blockSize), blockSize, _options.Timeout, _options.DeadConnectionTimeout, flags, [.. _sessions.Select(s => s.Socket)], _options.BackendIdentifier));
        }
        catch (Exception ex)
        {
            if (picked is int busy && ex is Nbd.Kernel.NbdKernelException { ErrnoName: "EBUSY" })
            {
                _busyPicks.Add(busy);
            }

            if (limitedBefore && wanted is int refused && refused != _netlinkIndex)
            {
                // Not ours after all (opened by someone between the check and CONNECT): put back what was there.
                RestoreRequestSizes(refused);
            }

            _claims.Release(Name, keep: _netlinkIndex); // a device this mapping has kept stays its own
            throw;
        }

        _claims.TryClaim(connected, Name);
        _claims.Release(Name, keep: connected);
        _netlinkIndex = connected;
        Volatile.Write(ref _devicePath, Nbd.Kernel.NbdKernel.DevicePath(connected));
        int taken = _sessions.Count(IsTaken);
        MappingLog.SocketsTaken(_logger, Name, DeviceText, "NBD_CMD_CONNECT", taken, _sessions.Count, ReadBack());
    }

    /// <summary>
    /// RECONFIGURE succeeds even when the kernel dropped a socket for want of a dead slot, so each one is checked;
    /// those not taken are offered again a few times (the kernel may not have marked the old slot dead yet).
    /// None taken fails the attempt (transient); some taken serves on those and closes the rest.
    /// </summary>
    private async Task ConfirmReconfigureAsync(int index, CancellationToken stop)
    {
        List<INbdSession> pending = [.. _sessions.Where(s => !IsTaken(s))];
        for (int retry = 0; retry < ReconfigureRetries && pending.Count > 0; retry++)
        {
            await Task.Delay(HeldRetryInterval, _time, stop);
            _netlink!.Reconfigure(index, [.. pending.Select(s => s.Socket)], _options.BackendIdentifier);
            pending = [.. pending.Where(s => !IsTaken(s))];
        }

        int taken = _sessions.Count - pending.Count;
        MappingLog.SocketsTaken(_logger, Name, DeviceText, "NBD_CMD_RECONFIGURE", taken, _sessions.Count, ReadBack(_sessions.Except(pending).ToList()));
        if (taken == 0)
        {
            throw new MappingException(string.Create(
                CultureInfo.InvariantCulture,
                $"kernel took 0 of {_sessions.Count} sockets on RECONFIGURE: no dead connection slot after {ReconfigureRetries + 1} tries over {(HeldRetryInterval * ReconfigureRetries).TotalSeconds:0.###} s"));
        }

        // Some taken: the device serves on them. Failing here would leave them in the kernel while the next attempt
        // brought a full set again, one more than there are dead slots, and fail the same way for ever.
        foreach (INbdSession notTaken in pending)
        {
            notTaken.Dispose();
        }

        _sessions = [.. _sessions.Except(pending)];
    }

    private void TryOpenNetlink()
    {
        try
        {
            _netlink ??= _kernel.OpenNetlink();
        }
#pragma warning disable CA1031 // The first attempt opens it again and reports the failure (e.g. nbd module not loaded).
        catch (Exception)
#pragma warning restore CA1031
        {
        }
    }

    private bool LeftOverDeviceExists()
    {
        try
        {
            return FindOwnDevice() is not null;
        }
#pragma warning disable CA1031 // Only chooses the retry schedule; the attempt itself reads sysfs again and reports failures.
        catch (Exception)
#pragma warning restore CA1031
        {
            return false;
        }
    }

    /// <summary>
    /// A device for NBD_CMD_CONNECT when none is configured. While no other mapping of ours names or has a device, the
    /// kernel picks the first free one itself (atomically); otherwise we pick, since the kernel would take a device that
    /// another mapping names and that only looks free because its server is down. With none free, the next index: the
    /// driver creates a device for an index it does not have.
    /// </summary>
    private int? PickNetlinkDevice()
    {
        if (!_claims.OthersHaveAny(Name))
        {
            return null;
        }

        IReadOnlyList<int> devices = _kernel.ListDevices();
        foreach (int index in devices)
        {
            if (!_busyPicks.Contains(index) && _kernel.ReadDevice(index) is { InUse: false } && _claims.TryClaim(index, Name))
            {
                return index;
            }
        }

        int next = devices.Count == 0 ? 0 : devices[^1] + 1;
        while (_busyPicks.Contains(next) || !_claims.TryClaim(next, Name))
        {
            next++;
        }

        return next;
    }

    /// <summary>The configured device, or else any nbd device, that an earlier daemon left configured for this mapping.</summary>
    private KernelDeviceInfo? FindOwnDevice()
    {
        IEnumerable<int> candidates = DeviceClaims.IndexOf(_options.Device) is int configured ? [configured] : _kernel.ListDevices();
        foreach (int candidate in candidates)
        {
            if (_kernel.ReadDevice(candidate) is { Connected: true } device && device.Backend == _options.BackendIdentifier)
            {
                return device;
            }
        }

        return null;
    }

    /// <summary>
    /// Takes over a device configured by an earlier daemon, after checking it against the export. Fresh sockets go
    /// in through RECONFIGURE; if the kernel takes none, its previous connection is still alive and keeps serving
    /// (LINK_DEAD will say when it dies, and the normal reconnect takes over).
    /// </summary>
    private void Adopt(KernelDeviceInfo device, ExportDescription export)
    {
        _claims.TryClaim(device.Index, Name); // ours by its backend identifier: no other mapping of ours may pick it
        uint block = device.LogicalBlockSize is 0 ? BlockSizePolicy.Minimum : device.LogicalBlockSize;
        // The kernel's capacity is the export size in whole 512-byte sectors; compare at the device's block size.
        if (export.Size / block != device.SizeBytes / block)
        {
            throw new DeviceMismatchException(string.Create(
                CultureInfo.InvariantCulture,
                $"export is {export.Size} bytes but {device.Path} (left configured by an earlier daemon) is {device.SizeBytes} bytes; not adopting it, device left untouched"), device, export);
        }

        if (export.ReadOnly && !device.ReadOnly)
        {
            throw new DeviceMismatchException($"export is read-only but {device.Path} (left configured by an earlier daemon) is writable; not adopting it, device left untouched", device, export);
        }

        // RECONFIGURE keeps the flags the device was connected with, and the block layer goes on issuing what its queue
        // attributes allow: a flush to a server without FLUSH fails, and the filesystem's journal with it.
        var lacking = device.Sends & ExportChangedException.FlagsTheKernelUses & ~(TransmissionFlags)export.TransmissionFlags;
        if (lacking != 0)
        {
            throw new DeviceMismatchException(
                $"export does not offer {ExportChangedException.FlagNames(lacking)}, which {device.Path} (left configured by an earlier daemon) sends (its queue attributes in sysfs); not adopting it, device left untouched",
                device,
                export);
        }

        // A resumed session is the kernel's current connection already (a relay handed over by the previous process):
        // only the fresh ones are offered.
        List<INbdSession> resumed = [.. _sessions.Where(s => s.Resumed)];
        List<INbdSession> fresh = [.. _sessions.Except(resumed)];
        if (fresh.Count > 0)
        {
            _netlink!.Reconfigure(device.Index, [.. fresh.Select(s => s.Socket)], _options.BackendIdentifier);
        }

        _netlinkIndex = device.Index;
        Volatile.Write(ref _devicePath, device.Path);
        List<INbdSession> taken = [.. fresh.Where(IsTaken)];
        foreach (INbdSession notTaken in fresh.Except(taken))
        {
            notTaken.Dispose();
        }

        // The mapping's Timeout, whatever the device had: the previous process may have raised it for a hand-over, or run
        // with another configuration.
        if (_options.Timeout > TimeSpan.Zero)
        {
            TryStep("NBD_CMD_RECONFIGURE timeout", () => _netlink!.SetTimeout(device.Index, _options.Timeout, _options.BackendIdentifier));
        }

        if (resumed.Count > 0)
        {
            MappingLog.AdoptedResumed(_logger, Name, DeviceText, _options.BackendIdentifier, device.SizeBytes, resumed.Count, taken.Count, fresh.Count);
            _sessions = [.. resumed, .. taken];
            return;
        }

        if (taken.Count == 0)
        {
            MappingLog.AdoptedStillConnected(_logger, Name, DeviceText, _options.BackendIdentifier, device.SizeBytes, _sessions.Count);
        }
        else
        {
            MappingLog.Adopted(_logger, Name, DeviceText, _options.BackendIdentifier, device.SizeBytes, taken.Count, _sessions.Count);
            MappingLog.SocketsTaken(_logger, Name, DeviceText, "NBD_CMD_RECONFIGURE (adopt)", taken.Count, _sessions.Count, ReadBack(taken));
        }

        _sessions = taken;
    }

    /// <summary>
    /// NBD_INFO_BLOCK_SIZE's maximum payload, which the client MUST NOT exceed (proto.md "Block size constraints"): the
    /// driver sends each block-layer request as one command, up to 128 KiB by default, so the block layer is told to
    /// make none larger. Not fatal when sysfs refuses: most servers take more than they announce, and a mapping that
    /// stopped over it would fail for certain what may well work.
    /// </summary>
    /// <param name="index">The device.</param>
    /// <param name="export">The server's answer.</param>
    /// <param name="quiet">A failure is not reported (a try before CONNECT: the device may not exist yet).</param>
    private void LimitRequestSize(int index, ExportDescription export, bool quiet = false)
    {
        if (export.MaximumPayload is not uint max)
        {
            return;
        }

        string device = Nbd.Kernel.NbdKernel.DevicePath(index);
        try
        {
            (uint before, uint after) = _kernel.LimitRequestSize(index, max);
            if (after < before)
            {
                MappingLog.RequestSizeLimited(_logger, Name, device, after, before, max);
                // The first value found is the one to put back when the device is given up.
                _loweredRequestSizes[index] = (_loweredRequestSizes.TryGetValue(index, out var earlier) ? earlier.Before : before, after);
            }
        }
        catch (Exception e) when (e is Nbd.Kernel.NbdKernelException or IOException or UnauthorizedAccessException or OverflowException)
        {
            if (!quiet && !_requestSizeWarned)
            {
                // Once: it would fail the same way at every reconnect.
                _requestSizeWarned = true;
                MappingLog.RequestSizeNotLimited(_logger, Name, device, max, e.Message);
            }
        }
    }

    /// <summary>
    /// The device is given up (a final release without Leave, or an ioctl device closed to reconnect): every request-size
    /// limit this loop wrote goes back to what it found, so the next user of the device (another mapping, nbd-client)
    /// does not inherit this server's maximum. A value changed by someone else since is left alone. Never throws.
    /// </summary>
    private void RestoreRequestSizes(int? only = null)
    {
        foreach ((int index, (uint before, uint after)) in _loweredRequestSizes.Where(d => only is null || d.Key == only))
        {
            string device = Nbd.Kernel.NbdKernel.DevicePath(index);
            try
            {
                if (_kernel.RestoreRequestSize(index, after, before))
                {
                    MappingLog.RequestSizeRestored(_logger, Name, device, before);
                }
            }
            catch (Exception e) when (e is Nbd.Kernel.NbdKernelException or IOException or UnauthorizedAccessException or OverflowException)
            {
                MappingLog.ReleaseStepFailed(_logger, e, Name, device, "restoring queue/max_sectors_kb");
            }
        }

        if (only is int one)
        {
            _loweredRequestSizes.Remove(one);
        }
        else
        {
            _loweredRequestSizes.Clear();
        }
    }

    /// <summary>
    /// The device as sysfs shows it when another client has it configured (another backend, or none): the kernel gave
    /// ours up during an outage (DeadConnectionTimeout) and does not ask who connects or disconnects it next. Null when it
    /// is ours or unconfigured.
    /// </summary>
    private KernelDeviceInfo? AnotherClients(int index) =>
        _kernel.ReadDevice(index) is { Connected: true } device && device.Backend != _options.BackendIdentifier ? device : null;

    private bool IsTaken(INbdSession session) => _kernel.ReadSendTimeout(session.Socket) > TimeSpan.Zero;

    /// <summary>The SO_SNDTIMEO read back from the first session (seconds), for the log.</summary>
    private double ReadBack(List<INbdSession>? sessions = null) =>
        (sessions ?? _sessions) is [INbdSession first, ..] ? _kernel.ReadSendTimeout(first.Socket).TotalSeconds : 0;

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

        string how = await WaitForNetlinkConnectionEndAsync(stop);
        _heldSince = _time.GetTimestamp();
        // LINK_DEAD names one dead slot. With several connections the others may still be up, and RECONFIGURE only
        // fills dead slots: end every socket of this generation so the kernel marks them all dead and the new
        // generation replaces the whole set.
        foreach (INbdSession session in _sessions)
        {
            session.Shutdown();
        }

        ReleaseConnection();
        return new LinkLostException($"connection lost ({how})");
    }

    /// <summary>
    /// Netlink while serving: returns how the connection ended, from whichever says so first: LINK_DEAD, or the
    /// sockets themselves (peer closed, error such as a keepalive timeout, or shut down by the driver). A LINK_DEAD
    /// while every current socket stays healthy is about an earlier generation's socket (with several connections
    /// the kernel reports each old slot as it dies, possibly after our RECONFIGURE) and is ignored: acting on it would
    /// tear down a healthy connection for nothing.
    /// </summary>
    private async Task<string> WaitForNetlinkConnectionEndAsync(CancellationToken stop)
    {
        int index = _netlinkIndex!.Value;
        // No watch (and LINK_DEAD alone decides) when adopted with the previous daemon's connection still alive: no
        // socket of ours; or when the watch cannot start (out of descriptors, say): the connection itself is fine.
        ISocketWatch? watch = null;
        try
        {
            watch = _sessions.Count == 0 ? null : _kernel.WatchSockets([.. _sessions.Select(s => s.Socket)]);
        }
#pragma warning disable CA1031 // Logged; serving goes on with LINK_DEAD alone.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            MappingLog.SocketWatchFailed(_logger, ex, Name, DeviceText);
        }

        try
        {
            return await WaitForNetlinkConnectionEndAsync(index, watch, stop);
        }
        finally
        {
            _currentWatch?.Dispose();
            _currentWatch = null;
        }
    }

    private async Task<string> WaitForNetlinkConnectionEndAsync(int index, ISocketWatch? watch, CancellationToken stop)
    {
        _currentWatch = watch;
        Task<string> ended = watch?.Ended ?? new TaskCompletionSource<string>().Task;
        while (true)
        {
            using var iteration = CancellationTokenSource.CreateLinkedTokenSource(stop);
            Task linkDead = _netlink!.WaitForLinkDeadAsync(index, iteration.Token);
            // The sockets' end first: when both are done (a broken subscription fails every wait at once), WhenAny
            // returns the first task given, and the loop below must not go on renewing over a connection that ended.
            Task first = await Task.WhenAny(ended, linkDead);
            if (first == ended)
            {
                await iteration.CancelAsync();
                if (ended.IsCompletedSuccessfully)
                {
                    return await ended;
                }

                MappingLog.SocketWatchFailed(_logger, ended.Exception?.GetBaseException(), Name, DeviceText);
                watch = null;
                ended = new TaskCompletionSource<string>().Task;
                continue;
            }

            if (linkDead.IsFaulted && !stop.IsCancellationRequested && _netlink is { EventsLost: true })
            {
                // The subscription failed, not the connection (ENOBUFS: events dropped for want of room). Ending
                // serving would tear down a healthy connection, and RECONFIGURE would find no dead slot for the new
                // one. A death while there was no subscription still shows on the watched sockets.
                try
                {
                    RenewBrokenNetlink();
                    MappingLog.EventsResubscribed(_logger, linkDead.Exception?.GetBaseException(), Name, DeviceText);
                }
#pragma warning disable CA1031 // The connection is fine: serving goes on, watched by its sockets, and the renewal is retried.
                catch (Exception ex)
#pragma warning restore CA1031
                {
                    // Not ending serving for that either (the same memory pressure may be why): the connection would be
                    // released while the kernel keeps it, and a later GaveUp would disconnect a healthy device.
                    MappingLog.EventsNotResubscribed(_logger, ex, Name, DeviceText);
                    await Task.WhenAny(ended, Task.Delay(TimeSpan.FromSeconds(1), _time, stop));
                    stop.ThrowIfCancellationRequested();
                }

                continue;
            }

            await linkDead; // the stop request, or a lost event subscription that could not be renewed, ends serving here
            if (watch is null)
            {
                return "LINK_DEAD"; // nothing to check it against
            }

            // The driver shuts a connection down as it reports it dead, so a LINK_DEAD for ours shows on its socket
            // at once; the grace only covers the event overtaking the shutdown.
            await Task.WhenAny(ended, Task.Delay(LinkDeadGrace, _time, stop));
            stop.ThrowIfCancellationRequested();
            if (ended.IsCompleted)
            {
                return ended.IsCompletedSuccessfully ? $"LINK_DEAD; {await ended}" : "LINK_DEAD";
            }

            if (_sessions.Count < _options.Connections && !_noSlotToFill)
            {
                // Serving on fewer connections than configured: the others are the previous process's, or were not
                // taken at the last RECONFIGURE. This LINK_DEAD may be one of them dying: fill its slot.
                if (await TopUpAsync(index, ended, stop))
                {
                    try
                    {
                        ISocketWatch renewed = _kernel.WatchSockets([.. _sessions.Select(s => s.Socket)]);
                        _currentWatch?.Dispose();
                        _currentWatch = watch = renewed;
                        ended = renewed.Ended;
                    }
#pragma warning disable CA1031 // Logged; the old watch goes on over the sockets it has, LINK_DEAD covers the rest.
                    catch (Exception ex)
#pragma warning restore CA1031
                    {
                        MappingLog.SocketWatchFailed(_logger, ex, Name, DeviceText);
                    }
                }

                continue;
            }

            MappingLog.StaleLinkDeadIgnored(_logger, Name, DeviceText);
        }
    }

    /// <summary>
    /// Fills dead slots of a device served on fewer connections than configured, with fresh connections through
    /// RECONFIGURE; the live ones are left as they are. True when the kernel took any. Failures are logged and serving
    /// goes on (the device has live connections); throws only for the stop. Given up as soon as one of the current
    /// sockets ends (<paramref name="ended"/>): that loss is for the normal reconnect, which must not wait for this.
    /// </summary>
    private async Task<bool> TopUpAsync(int index, Task ended, CancellationToken stop)
    {
        List<INbdSession> fresh = [];
        using var lostOrStop = CancellationTokenSource.CreateLinkedTokenSource(stop);
        _ = ended.ContinueWith(static (_, state) => TryCancel((CancellationTokenSource)state!), lostOrStop, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        try
        {
            fresh = await ConnectAllAsync(_options.Connections - _sessions.Count, lostOrStop.Token);
            foreach (INbdSession session in fresh)
            {
                CheckTopUpExport(session.Export);
                _kernel.ClearSendTimeout(session.Socket);
            }

            _netlink!.Reconfigure(index, [.. fresh.Select(s => s.Socket)], _options.BackendIdentifier);
            List<INbdSession> taken = [.. fresh.Where(IsTaken)];
            int offered = fresh.Count;
            // The kernel's from here: whatever fails below, they stay with the mapping (closing them would kill the slots).
            _sessions = [.. _sessions, .. taken];
            List<INbdSession> dropped = [.. fresh.Except(taken)];
            fresh = [];
            DisposeAll(dropped);
            // None taken: no dead slot (a stale LINK_DEAD, or a device with fewer slots than Connections); not tried
            // again for LINK_DEADs of this connection.
            _noSlotToFill = taken.Count == 0;
            MappingLog.SocketsTaken(_logger, Name, DeviceText, "NBD_CMD_RECONFIGURE (dead slot filled)", taken.Count, offered, ReadBack(taken));
            foreach (INbdSession session in taken)
            {
                session.Serves(DeviceText);
            }

            return taken.Count > 0;
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
            DisposeAll(fresh);
            throw;
        }
#pragma warning disable CA1031 // The device serves on its live connections; the next LINK_DEAD tries again.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            DisposeAll(fresh);
            if (!ended.IsCompleted)
            {
                MappingLog.TopUpFailed(_logger, Name, DeviceText, FailureText.Describe(ex));
            }

            return false;
        }
    }

    private static void TryCancel(CancellationTokenSource source)
    {
        try
        {
            source.Cancel();
        }
        catch (ObjectDisposedException)
        {
            // The top-up is over already.
        }
    }

    /// <summary>
    /// A connection that is to join the device's: the export the kernel was configured with, and a server that still
    /// allows more than one connection (<see cref="Negotiate"/> checks the same at every attempt).
    /// </summary>
    private void CheckTopUpExport(ExportDescription export)
    {
        if (_established is { } before && ExportChangedException.Compare(before, export, _options.ReadOnly) is { } changed)
        {
            throw changed;
        }

        if ((export.TransmissionFlags & ExportDescription.FlagCanMultiConn) == 0)
        {
            throw new MappingException("the server no longer allows several connections (no NBD_FLAG_CAN_MULTI_CONN)");
        }

        if (_netlinkIndex is int index)
        {
            LimitRequestSize(index, export);
        }
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
        if (_options.Interface == KernelInterface.Ioctl && _device is not null && _serviceLoop is null)
        {
            if (_kernelHasSockets)
            {
                TryStep("NBD_CLEAR_QUE", _device.ClearQueue);
                TryStep("NBD_CLEAR_SOCK", _device.ClearSocket);
            }

            TryStep("close device", _device.Dispose);
            _device = null;
            _kernelHasSockets = false;
            RestoreRequestSizes();
        }

        DisposeAll(_sessions);
        _sessions = [];
        _noSlotToFill = false;
    }

    /// <summary>
    /// Stopping, GaveUp and Failed: clear queue, disconnect, clear socket, release everything. Never throws.
    /// A stop request with OnStop=Leave (netlink) only closes our descriptors: the kernel keeps its own references
    /// to the sockets and goes on serving.
    /// </summary>
    private async Task ReleaseAsync(bool stopRequested)
    {
        if (_device is { } device)
        {
            if (_serviceLoop is { } loop)
            {
                TryStep("NBD_CLEAR_QUE", device.ClearQueue);
                // The loop's stop is NBD_DISCONNECT (bounded) then NBD_CLEAR_SOCK, once each: a second NBD_DISCONNECT
                // goes to a server that already closed on the first ("Send disconnect failed -32" in the kernel log).
                try
                {
                    loop.Stop();
                    _kernelHasSockets = false;
                }
#pragma warning disable CA1031 // Teardown continues whatever the stop threw.
                catch (Exception ex)
#pragma warning restore CA1031
                {
                    MappingLog.ReleaseStepFailed(_logger, ex, Name, DeviceText, "NBD_DISCONNECT and NBD_CLEAR_SOCK (service loop stop)");
                    if (ex is Nbd.Kernel.NbdKernelException { ErrnoName: "ETIMEDOUT" })
                    {
                        // The disconnect is still stuck in the driver, holding the device's config_lock: NBD_CLEAR_SOCK
                        // would wait for it uninterruptibly, and the process could then never exit (systemd's SIGKILL
                        // included). Closing the descriptor is all that is left.
                        _kernelHasSockets = false;
                    }
                }

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

            if (_kernelHasSockets)
            {
                TryStep("NBD_CLEAR_SOCK", device.ClearSocket);
            }

            TryStep("close device", device.Dispose);
            _device = null;
            _kernelHasSockets = false;
        }

        if (_netlink is { } netlink)
        {
            if (_netlinkIndex is int index)
            {
                if (stopRequested && _options.OnStop == StopAction.Leave)
                {
                    MappingLog.LeftConfigured(_logger, Name, DeviceText);
                    // A resumed end not relayed on yet (a stop between adoption and serving) goes back to the store
                    // too, and adoption had already set the mapping's own Timeout on the device.
                    if (_sessions.Any(s => s.CanHandOver || s.Resumed))
                    {
                        // Before the relays stop reading: every request started from here on gets the longer deadline.
                        TryStep("NBD_CMD_RECONFIGURE timeout for the hand-over", () => netlink.SetTimeout(index, HandOverTimeout, _options.BackendIdentifier));
                    }

                    // Side by side: each relay may wait its limit for the replies it owes, and N of them one after
                    // another would pass the host's shutdown timeout. One thread each: Parallel.For runs on the thread
                    // pool, which every mapping stopping at once can exhaust, and then ran them one after another.
                    // HandOver never throws.
                    List<INbdSession> sessions = _sessions;
                    var handOvers = sessions.Select((session, slot) => new Thread(() => HandOverGuarded(session, slot))
                    {
                        IsBackground = true,
                        Name = string.Create(CultureInfo.InvariantCulture, $"nbd-handover {Name}/{slot}"),
                    }).ToList();
                    handOvers.ForEach(t => t.Start());
                    handOvers.ForEach(t => t.Join());
                }
                else if (AnotherClients(index) is { } now)
                {
                    // Freed and taken by another client while we could not reach our server (the kernel does not ask
                    // who disconnects): theirs now.
                    MappingLog.NotOursAnyMore(_logger, Name, Nbd.Kernel.NbdKernel.DevicePath(index), now.Backend ?? "none");
                }
                else
                {
                    TryStep("NBD_CMD_DISCONNECT", () => netlink.Disconnect(index));

                    // The kernel's connections are gone with the device: a resumed end is no longer worth keeping.
                    foreach (INbdSession resumed in _sessions.Where(s => s.Resumed))
                    {
                        resumed.Shutdown();
                    }
                }

                _netlinkIndex = null;
            }

            TryStep("close netlink", netlink.Dispose);
            _netlink = null;
        }

        // Left configured (OnStop=Leave), the device keeps its server and so its limit.
        if (!(stopRequested && _options.OnStop == StopAction.Leave))
        {
            RestoreRequestSizes();
        }

        DisposeAll(_sessions);
        _sessions = [];
        _noSlotToFill = false;
    }

    /// <summary>Runs one teardown step; false (logged with the operation) when it failed.</summary>
    private bool TryStep(string operation, Action step)
    {
        try
        {
            step();
            return true;
        }
#pragma warning disable CA1031 // Teardown must run every step; failures are logged with the operation.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            MappingLog.ReleaseStepFailed(_logger, ex, Name, DeviceText, operation);
            return false;
        }
    }

    private static void DisposeAll(List<INbdSession> sessions)
    {
        foreach (INbdSession session in sessions)
        {
            session.Dispose();
        }
    }

    /// <summary>
    /// A control whose event subscription failed fails every wait for LINK_DEAD at once, so Serving would end as soon as
    /// it began, for good: it is replaced by a new one, which subscribes afresh. False when there was none to replace.
    /// If the new one cannot be opened, that fails the attempt and the broken one is kept for the next to replace.
    /// </summary>
    private bool RenewBrokenNetlink()
    {
        if (_netlink is not { EventsLost: true } broken)
        {
            return false;
        }

        _netlink = _kernel.OpenNetlink();
        TryStep("close netlink (event subscription lost)", broken.Dispose);
        return true;
    }

    /// <summary>
    /// Before the first ioctl on a configured /dev/nbdN: a device that another client set up (NBD_DO_IT running, a
    /// netlink connection, or a size set: <see cref="KernelDeviceInfo.InUse"/>) is refused without a single ioctl,
    /// since configuring it would resize a live device before SET_SOCK failed with EBUSY.
    /// Once the device took our socket it is ours: a reconnect reopens it whatever sysfs says (a mounted device keeps
    /// its size and configuration until its last opener closes it).
    /// </summary>
    private void RefuseDeviceInUse()
    {
        if (DeviceClaims.IndexOf(_options.Device) is not int index || _kernel.ReadDevice(index) is not { } info)
        {
            return; // no configured device (OpenUnused checks), or no such device (the open fails and says so)
        }

        if (info.InUse)
        {
            string who = info.Backend is { Length: > 0 } backend ? $"backend '{backend}'" : info.Connected ? "connected" : "size set";
            throw new MappingException(string.Create(
                CultureInfo.InvariantCulture,
                $"{info.Path} is in use by another client ({who}, {info.SizeBytes} bytes): not touching it"));
        }
    }

    /// <summary>
    /// A reconnect of our own ioctl device, after we closed it: if sysfs still shows a configuration (<c>pid</c>), another
    /// opener (a mounted filesystem, a process with it open) holds the device, and the driver keeps the old connection's
    /// configuration until its last close. NBD_SET_SOCK would still succeed (the socket is appended to that configuration,
    /// and stays there, connected to the server, until the last close), and NBD_DO_IT would then fail with EBUSY: one
    /// more server connection per retry, forever. Refused instead, until the device is closed.
    /// </summary>
    private void RefuseHeldConfiguration()
    {
        if (DeviceClaims.IndexOf(Device) is int index && _kernel.ReadDevice(index) is { Connected: true } info)
        {
            throw new MappingException(string.Create(
                CultureInfo.InvariantCulture,
                $"{info.Path} is still held open (mounted, or open in a process): the driver keeps its old connection until the last close, so it cannot take a new one; retrying until it is closed (Interface=Netlink reconnects under a holder)"));
        }
    }

    private string DeviceText => Device ?? "(unassigned)";

    /// <summary>On a thread of its own, where an exception would end the process: HandOver is not meant to throw.</summary>
    private void HandOverGuarded(INbdSession session, int slot)
    {
        try
        {
            session.HandOver(slot);
        }
#pragma warning disable CA1031 // A stop must finish whatever one relay does.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            MappingLog.ReleaseStepFailed(_logger, ex, Name, DeviceText, string.Create(CultureInfo.InvariantCulture, $"relay hand-over of connection {slot}"));
        }
    }

    /// <summary>
    /// What the device is, for the Serving line: its size in blocks (and what of the export a partial last block
    /// leaves out), whether it is writable and why not, the connections. Before, nothing said that an export came
    /// read-only from the server, or that its last bytes were not mapped.
    /// </summary>
    private string ServingDetail(ExportDescription export, uint blockSize)
    {
        ulong blocks = export.Size / blockSize;
        ulong left = export.Size % blockSize;
        string access = (export.TransmissionFlags & ExportDescription.FlagReadOnly) != 0 ? "read-only (the server exports it read-only)"
            : _options.ReadOnly ? "read-only (ReadOnly)"
            : "read-write";
        return string.Create(CultureInfo.InvariantCulture, $"; {blocks * blockSize} bytes, {blocks} blocks of {blockSize}")
            + (left > 0 ? string.Create(CultureInfo.InvariantCulture, $" (the export's last {left} bytes, less than a block, not mapped)") : "")
            + ", " + access
            + (_sessions.Count > 1 ? string.Create(CultureInfo.InvariantCulture, $", {_sessions.Count} connections") : "");
    }

    /// <summary>
    /// A failure whose reason text says what happened: one of ours, the protocol's, a socket's, a kernel call's, all
    /// the way down (a MappingException around a NullReferenceException is a bug, and keeps its trace).
    /// </summary>
    private static bool IsExplained(Exception exception)
    {
        for (Exception? e = exception; e is not null; e = e.InnerException)
        {
            // A cancellation inside is the attempt's own deadline ("connect and handshake not done within …"), which
            // the outer exception's reason already says; one on its own is no failure of an attempt.
            if (e is not (MappingException or Nbd.Protocol.NbdException or System.Net.Sockets.SocketException or TimeoutException
                or Nbd.Kernel.NbdKernelException or IOException) && !(e is OperationCanceledException && e != exception))
            {
                return false;
            }
        }

        return true;
    }

    private void Transition(MappingState next, Exception? exception = null, string detail = "", bool quiet = false)
    {
        MappingState previous;
        lock (_stateLock)
        {
            previous = _state;
            _state = next;
            _stateEnteredAt = _time.GetTimestamp();
        }

        LogLevel level = quiet ? LogLevel.Debug
            : next is MappingState.Reconnecting or MappingState.GaveUp or MappingState.Failed ? LogLevel.Warning : LogLevel.Information;
        // A failure the line's own words explain (connection refused, a server's refusal, a kernel call's errno) goes
        // without the stack trace, which says nothing to an admin and is a dozen journal lines a time; it follows at
        // Debug. Anything else, a bug, keeps it on the line.
        Exception? trace = exception is not null && level > LogLevel.Debug && IsExplained(exception) ? null : exception;
        MappingLog.Transition(_logger, level, trace, Name, DeviceText, _options.Endpoint.Server, _options.Endpoint.Export, previous, next, detail);
        if (exception is not null && trace is null)
        {
            MappingLog.FailureTrace(_logger, exception, Name, DeviceText);
        }

        StateChanged?.Invoke(this, next);
    }
}

using System.Globalization;
using System.Net.Sockets;
using Nbd.Kernel;
using Nbd.Protocol.Transmission;
using NbdDaemon.Configuration;
using NbdDaemon.Systemd;

namespace NbdDaemon.Mappings.Linux;

/// <summary>
/// <see cref="INbdConnector"/> for mappings with <c>Relay: true</c>: the kernel gets one end of a socket pair instead of
/// the server connection, and an <see cref="NbdRelay"/> carries the traffic. When the server connection ends, the relay
/// connects again through the inner connector, checks that the export is the same disk, and resends the requests in
/// flight, so the driver sees a slow reply instead of a dead connection. Only when no new connection comes within the
/// mapping's Timeout does the relay give up and shut the kernel's end down: the driver then sees a dead connection and
/// the mapping's own reconnect takes over, as without the relay. Mappings without the key go straight to the inner
/// connector.
/// A restart of the daemon need not end the kernel's connection either: on a stop that leaves the device configured
/// (OnStop=Leave) each relay stops between two requests with every reply delivered and passes its end of the pair to
/// systemd's file descriptor store (<see cref="INbdSession.HandOver"/>); the next process takes it back, connects to
/// the server and relays on it from the next request (<see cref="INbdSession.Resumed"/>): the driver only sees a pause.
/// </summary>
internal sealed class RelayingConnector(INbdConnector inner, ILoggerFactory loggers, TimeProvider time, IFileDescriptorStore store) : INbdConnector
{
    /// <summary>Pause between the relay's reconnect attempts; the first one is immediate.</summary>
    public static readonly TimeSpan RetryInterval = TimeSpan.FromMilliseconds(250);

    /// <summary>How long a stop waits for a relay to reach a point where it can hand over (replies still owed).</summary>
    public static readonly TimeSpan HandOverLimit = TimeSpan.FromSeconds(5);

    private readonly ILogger _logger = loggers.CreateLogger("NbdDaemon.Mappings.Relay");
    private readonly IFileDescriptorStore _store = store;

    public async Task<INbdSession> ConnectAsync(MappingOptions mapping, CancellationToken cancellationToken)
    {
        INbdSession first = await inner.ConnectAsync(mapping, cancellationToken);
        if (!mapping.Relay)
        {
            return first;
        }

        Socket? kernelEnd = null;
        Socket relayEnd;
        string? takenName = null;
        try
        {
            // Only a netlink mapping can be adopted with it (an ioctl device dies with the process that served it).
            if (ResumablePrefix(mapping) is string prefix && _store.Take(prefix) is { } taken)
            {
                (takenName, relayEnd) = taken;
            }
            else
            {
                (kernelEnd, relayEnd) = NbdSocketPair.Create();
            }
        }
        catch (NbdKernelException e)
        {
            first.Dispose();
            throw new MappingException("could not create the relay's socket pair: " + e.Message, FailureKind.Transient, e);
        }

        var session = new RelaySession(this, mapping, first, kernelEnd, relayEnd, takenName);

        // A resumed relay starts once the mapping adopted the device with it (Serves): until the export was checked
        // against the device, no request of the kernel's goes to this server, and the end can go back to the store
        // untouched should this attempt fail.
        if (!session.Resumed)
        {
            session.Start();
        }

        return session;
    }

    private NbdRelay CreateRelay(MappingOptions mapping, INbdSession first, Socket relayEnd, RelaySession session)
    {
        var relay = new NbdRelay(relayEnd, first.Socket, new NbdRelayOptions
        {
            Reconnect = ct => ReconnectAsync(mapping, first.Export, session, ct),
            // Ioctl allows Timeout 0 (the driver never times a request out): the relay still stops trying at some point.
            GiveUpAfter = mapping.Timeout > TimeSpan.Zero ? mapping.Timeout : MappingOptions.DefaultTimeout,
            RetryInterval = RetryInterval,
            IsPermanent = e => e is ExportChangedException,
            Events = e => Log(mapping, session.Device, e),
            Name = "nbd-relay " + mapping.Name,
            TimeProvider = time,
        });
        _ = relay.Completion.ContinueWith(t => Log(mapping, session.Device, t.Result), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        return relay;
    }

    /// <summary>The name a mapping's relay ends have in systemd's store: "nbd-relay/NAME/SLOT" (names have no '/').</summary>
    private static string DescriptorName(MappingOptions mapping, int slot) => DescriptorPrefix(mapping) + slot.ToString(CultureInfo.InvariantCulture);

    /// <summary>The device a relay's log line names: the one the mapping serves, else the configured one.</summary>
    private static string DeviceText(MappingOptions mapping, string? served) => served ?? mapping.Device ?? "(unassigned)";

    private static string DescriptorPrefix(MappingOptions mapping) => "nbd-relay/" + mapping.Name + "/";

    /// <summary>Marks an end given back (nbd-relay/NAME/returned-SLOT), apart from the ends a stop hands over (…/SLOT).</summary>
    private const string GivenBackMark = "returned-";

    /// <summary>
    /// The prefix of the names under which <paramref name="mapping"/> takes back relay ends from systemd's store; null when
    /// it takes none (no relay, or an ioctl device, which dies with the process that served it).
    /// </summary>
    public static string? ResumablePrefix(MappingOptions mapping) =>
        mapping.Relay && mapping.Interface == KernelInterface.Netlink ? DescriptorPrefix(mapping) : null;

    private void HandOver(MappingOptions mapping, RelaySession session, Socket? kernelEnd, NbdRelay relay, int slot)
    {
        string device = DeviceText(mapping, session.Device);
        if (!_store.CanStore)
        {
            RelayLog.NotHandedOver(_logger, null, mapping.Name, device, "not run by systemd with a file descriptor store");
            return;
        }

        // Before anything is raised or stopped: systemd would close an end beyond FileDescriptorStoreMax= and say so only
        // in its own log, and this relay would have stopped reading for nothing, its kernel end at the hand-over timeout.
        if (!_store.TryReserve())
        {
            RelayLog.NotHandedOver(_logger, null, mapping.Name, device, string.Create(CultureInfo.InvariantCulture,
                $"systemd's file descriptor store is full (FileDescriptorStoreMax={_store.Capacity}): raise it in the unit to hand every relay connection over"));
            return;
        }

        bool stored = false;
        string name = DescriptorName(mapping, slot);
        try
        {
            // While no process reads, the driver's sends block once the pair's buffer is full, and give the connection up
            // after SO_SNDTIMEO (it set the request timeout there). A resumed session has no descriptor for the kernel's
            // end: the first hand-over's value stays.
            if (kernelEnd is not null)
            {
                NbdSocketTimeout.Set(kernelEnd, MappingLoop.HandOverTimeout);
            }

            if (relay.TryHandOver(HandOverLimit, end =>
            {
                _store.Store(name, end);
                stored = true;
            }))
            {
                RelayLog.HandedOver(_logger, mapping.Name, device, name);
            }
            else
            {
                RelayLog.NotHandedOver(_logger, null, mapping.Name, device, relay.Completion.IsCompleted
                    ? "the relay had ended"
                    : string.Create(CultureInfo.InvariantCulture, $"{relay.InFlight} requests still unanswered after {HandOverLimit.TotalSeconds:0.###} s"));
            }
        }
#pragma warning disable CA1031 // A failed hand-over ends like a plain stop: logged, the relay disposed as usual.
        catch (Exception e)
#pragma warning restore CA1031
        {
            RelayLog.NotHandedOver(_logger, e, mapping.Name, device, "passing it to systemd failed: " + e.Message);
        }
        finally
        {
            if (!stored)
            {
                _store.Unreserve();
            }
        }
    }

    /// <summary>
    /// A handed-over end this process took but never relayed on (the attempt failed before the mapping served, or the
    /// daemon stopped meanwhile): nothing was read from it or written to it, so it goes back to the store as it came,
    /// for the next attempt or the next start, instead of ending the kernel's connection.
    /// </summary>
    private void GiveBack(MappingOptions mapping, string? served, string taken, Socket relayEnd)
    {
        // Not under its slot name: a stop may hand the mapping's other relays over under "SLOT" names right now, and a
        // duplicate name would let one FDSTOREREMOVE take both out of systemd's store. Take matches the prefix.
        string prefix = DescriptorPrefix(mapping);
        string suffix = taken.StartsWith(prefix, StringComparison.Ordinal) ? taken[prefix.Length..] : taken;
        string name = suffix.StartsWith(GivenBackMark, StringComparison.Ordinal) ? prefix + suffix : prefix + GivenBackMark + suffix;
        _store.GiveBack(name, relayEnd);
        RelayLog.GivenBack(_logger, mapping.Name, DeviceText(mapping, served), name);
    }

    /// <summary>
    /// A new connection for the relay, refused (permanently: the relay gives up at once) when the export is no longer
    /// the disk the kernel has been writing to (<see cref="ExportChangedException.Compare"/>).
    /// </summary>
    private async Task<Socket> ReconnectAsync(MappingOptions mapping, ExportDescription before, RelaySession owner, CancellationToken cancellationToken)
    {
        INbdSession next = await inner.ConnectAsync(mapping, cancellationToken);
        if (ExportChangedException.Compare(before, next.Export, mapping.ReadOnly) is { } changed)
        {
            next.Dispose();
            throw changed;
        }

        owner.Adopt(next);
        return next.Socket;
    }

    private void Log(MappingOptions mapping, string? served, NbdRelayEvent relayEvent)
    {
        string device = DeviceText(mapping, served);
        switch (relayEvent)
        {
            case NbdRelayServerLost lost:
                RelayLog.ServerLost(_logger, mapping.Name, device, lost.Reason, lost.InFlight);
                break;
            case NbdRelayReconnectFailed failed:
                RelayLog.ReconnectFailed(_logger, failed.Attempt is 1 or 0 || int.IsPow2(failed.Attempt) ? LogLevel.Information : LogLevel.Debug, mapping.Name, device, failed.Attempt, FailureText.Describe(failed.Exception));
                break;
            case NbdRelayReconnected back:
                RelayLog.Reconnected(_logger, mapping.Name, device, back.Outage.TotalMilliseconds, back.Attempts, back.Resent);
                break;
        }
    }

    private void Log(MappingOptions mapping, string? served, NbdRelayEnd end)
    {
        string device = DeviceText(mapping, served);
        LogLevel level = end.Reason is NbdRelayEndReason.Failed ? LogLevel.Error
            : end.Reason is NbdRelayEndReason.GaveUp or NbdRelayEndReason.KernelProtocolError ? LogLevel.Warning : LogLevel.Debug;
        RelayLog.Ended(_logger, level, end.Exception, mapping.Name, device, end.Reason, end.Detail);
    }

    /// <summary>
    /// The session MappingLoop sees: its socket is the kernel's end of the pair; disposing it stops the relay and closes
    /// every server connection the relay used.
    /// A resumed session has no kernel end (the kernel holds the only one): its socket is the relay's end, which shows
    /// the connection's end to a watch just as well, and shutting it down ends the kernel's connection the same way.
    /// </summary>
    private sealed class RelaySession(RelayingConnector owner, MappingOptions mapping, INbdSession first, Socket? kernelEnd, Socket relayEnd, string? takenName) : INbdSession
    {
        private readonly Lock _lock = new();
        private readonly List<INbdSession> _connections = [first];
        private NbdRelay? _relay;
        private bool _disposed;
        private string? _device;
        private bool _ending;
        private volatile bool _shutDown;

        public ExportDescription Export => first.Export;

        public Socket Socket => kernelEnd ?? relayEnd;

        public bool Resumed => kernelEnd is null;

        public bool CanHandOver => Volatile.Read(ref _relay) is { Completion.IsCompleted: false } && owner._store.CanStore;

        /// <summary>The device for the relay's log lines; null until the mapping serves.</summary>
        public string? Device => Volatile.Read(ref _device);

        public void Serves(string device)
        {
            Volatile.Write(ref _device, device);
            if (Resumed && Start())
            {
                RelayLog.Resumed(owner._logger, mapping.Name, device);
            }
        }

        /// <summary>Creates and starts the relay over the session's end; false when it was started already.</summary>
        public bool Start()
        {
            NbdRelay relay;
            lock (_lock)
            {
                if (_relay is not null || _ending)
                {
                    return false;
                }

                relay = owner.CreateRelay(mapping, first, relayEnd, this);
                _relay = relay;

                // Under the lock, so that a Dispose never meets a relay created but not started (it would not wait
                // for threads that start afterwards on closed sockets). The relay's threads take the lock only later.
                relay.Start();
            }

            return true;
        }

        public void HandOver(int slot)
        {
            if (Volatile.Read(ref _relay) is { } relay)
            {
                owner.HandOver(mapping, this, kernelEnd, relay, slot);
            }
        }

        /// <summary>
        /// Keeps a reconnect's session for disposal; one arriving after Dispose is closed at once. The relay reconnects
        /// only after it closed the previous connection, so the sessions held so far are dead: they are released here,
        /// or a relay that outlives months of connection cuts would keep one per cut.
        /// </summary>
        public void Adopt(INbdSession next)
        {
            List<INbdSession> dead;
            lock (_lock)
            {
                if (!_disposed)
                {
                    dead = [.. _connections];
                    _connections.Clear();
                    _connections.Add(next);
                }
                else
                {
                    dead = [next];
                }
            }

            foreach (INbdSession connection in dead)
            {
                connection.Dispose();
            }

            if (dead.Contains(next))
            {
                throw new ObjectDisposedException(nameof(RelaySession));
            }
        }

        /// <summary>Ends the kernel's connection (the relay then sees its end close and stops).</summary>
        public void Shutdown()
        {
            _shutDown = true;
            try
            {
                Socket.Shutdown(SocketShutdown.Both);
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                // Already shut down by the kernel or the relay.
            }
        }

        public void Dispose()
        {
            // Not under the lock while the relay stops: its reconnect thread may be waiting for it in Adopt.
            NbdRelay? relay;
            bool first;
            lock (_lock)
            {
                first = !_ending;
                _ending = true;
                relay = _relay;
            }

            if (relay is not null)
            {
                relay.Dispose(); // closes our end too
            }
            else if (first)
            {
                // Never relayed on. A taken end goes back untouched, unless Shutdown ended the kernel's connection.
                if (takenName is not null && !_shutDown)
                {
                    owner.GiveBack(mapping, Device, takenName, relayEnd);
                }
                else
                {
                    relayEnd.Dispose();
                }
            }

            kernelEnd?.Dispose();
            List<INbdSession> connections;
            lock (_lock)
            {
                _disposed = true;
                connections = [.. _connections];
                _connections.Clear();
            }

            foreach (INbdSession connection in connections)
            {
                connection.Dispose();
            }
        }
    }
}

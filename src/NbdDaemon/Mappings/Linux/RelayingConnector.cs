using System.Globalization;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using Microsoft.Win32.SafeHandles;
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
/// A crash need not end it either. A netlink relay run by systemd with a file descriptor store keeps a journal
/// (<see cref="RelayJournal"/>: the requests in flight and what of the replies went out, in a memfd) and stores it, with
/// both ends of the kernel's connection, in systemd's store as a group ("nbd-journal/NAME/ID/…") for as long as it
/// serves: when the process is killed anywhere, the next one takes the group, finishes a reply the kill cut off and
/// resends what the kernel still waits for (<see cref="NbdRelay.Journaled"/>). A stop that leaves the device then only
/// quiesces the relay and keeps the group.
/// </summary>
internal sealed class RelayingConnector(INbdConnector inner, ILoggerFactory loggers, TimeProvider time, IFileDescriptorStore store) : INbdConnector
{
    /// <summary>Pause between the relay's reconnect attempts; the first one is immediate.</summary>
    public static readonly TimeSpan RetryInterval = TimeSpan.FromMilliseconds(250);

    /// <summary>How long a stop waits for a relay to reach a point where it can hand over (replies still owed).</summary>
    public static readonly TimeSpan HandOverLimit = TimeSpan.FromSeconds(5);

    /// <summary>
    /// The journal's ring: the kernel's requests until they are answered, writes with their data. A request larger than
    /// that (max_sectors_kb raised above 8 MiB) abandons the journal: the relay carries on, a crash then costs the
    /// driver's timeout. Pages of a memfd, so memory once touched: a wrap of the ring touches all of it.
    /// </summary>
    public const int JournalRingBytes = 8 << 20;

    /// <summary>The members of a journal group in systemd's store, in the order the store hands them back.</summary>
    private static readonly string[] JournalMembers = ["relay-end", "kernel-end", "journal"];

    /// <summary>How many descriptors a relay connection's journal group holds in systemd's store.</summary>
    public static int JournalDescriptors => JournalMembers.Length;

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
        Socket? relayEnd = null;
        string? takenName = null;
        JournalGroup? takenJournal = null;
        RelayJournal? journal = null;
        try
        {
            // Only a netlink mapping can be adopted with it (an ioctl device dies with the process that served it).
            if (IsResumable(mapping) && TakeJournal(mapping) is { } group)
            {
                takenJournal = group;
            }
            else if (IsResumable(mapping) && _store.Take(DescriptorPrefix(mapping)) is { } taken)
            {
                // Handed over at a stop by a process that kept no journal.
                (takenName, relayEnd) = taken;
            }
            else
            {
                (kernelEnd, relayEnd) = NbdSocketPair.Create();
                journal = CreateJournal(mapping);
            }
        }
        catch (NbdKernelException e)
        {
            first.Dispose();
            kernelEnd?.Dispose();
            relayEnd?.Dispose();
            throw new MappingException("could not create the relay's socket pair: " + e.Message, FailureKind.Transient, e);
        }

        RelaySession session;
        try
        {
            session = takenJournal is not null
                ? new RelaySession(this, mapping, first, takenJournal)
                : new RelaySession(this, mapping, first, kernelEnd, relayEnd!, takenName, journal);
        }
        catch (SocketException e)
        {
            // A view over a taken group's end (checked to be a stream socket, so not expected).
            first.Dispose();
            if (takenJournal is not null)
            {
                RemoveJournal(takenJournal.Name);
                takenJournal.Dispose();
            }

            throw new MappingException("could not take up the relay's journal: " + e.Message, FailureKind.Transient, e);
        }

        // A resumed relay starts once the mapping adopted the device with it (Serves): until the export was checked
        // against the device, no request of the kernel's goes to this server, and the end can go back to the store
        // untouched should this attempt fail.
        if (!session.Resumed)
        {
            try
            {
                session.Start();
            }
#pragma warning disable CA1031 // Whatever it was, the session and its room in the store go; the attempt fails with the reason.
            catch (Exception e)
#pragma warning restore CA1031
            {
                session.Dispose();
                throw new MappingException("could not start the relay: " + e.Message, FailureKind.Transient, e);
            }
        }

        return session;
    }

    /// <summary>
    /// A new journal for a connection of <paramref name="mapping"/>, with room reserved for its group in systemd's store;
    /// null when the mapping cannot be resumed or is not run with a store, or when the store cannot take the group or
    /// the memfd cannot be made (both said in the log: a crash then costs the driver's timeout).
    /// </summary>
    private RelayJournal? CreateJournal(MappingOptions mapping)
    {
        if (!IsResumable(mapping) || !_store.CanStore)
        {
            return null;
        }

        int reserved = 0;
        while (reserved < JournalDescriptors && _store.TryReserve())
        {
            reserved++;
        }

        if (reserved < JournalDescriptors)
        {
            Unreserve(reserved);
            RelayLog.JournalNotKept(_logger, mapping.Name, DeviceText(mapping, null), string.Create(CultureInfo.InvariantCulture,
                $"systemd's file descriptor store is full (FileDescriptorStoreMax={_store.Capacity}; {JournalDescriptors} per relay connection)"));
            return null;
        }

        try
        {
            return RelayJournal.Create(JournalRingBytes);
        }
        catch (IOException e)
        {
            Unreserve(reserved);
            RelayLog.JournalNotKept(_logger, mapping.Name, DeviceText(mapping, null), "its memfd could not be made: " + e.Message);
            return null;
        }
    }

    private void Unreserve(int count)
    {
        for (int i = 0; i < count; i++)
        {
            _store.Unreserve();
        }
    }

    /// <summary>
    /// A journal group a killed (or stopped) predecessor left in systemd's store for <paramref name="mapping"/>, both
    /// ends checked to be stream sockets; one that is not is taken out of the store and closed, with a log line.
    /// </summary>
    private JournalGroup? TakeJournal(MappingOptions mapping)
    {
        while (_store.TakeGroup(JournalPrefix(mapping), JournalMembers) is { } taken)
        {
            var group = new JournalGroup(taken.Group, taken.Descriptors[0], taken.Descriptors[1], taken.Descriptors[2]);
            try
            {
                UnixDescriptorPassing.CheckStreamSocket(group.RelayEnd);
                UnixDescriptorPassing.CheckStreamSocket(group.KernelEnd);
                return group;
            }
            catch (NbdKernelException e)
            {
                RelayLog.JournalRefused(_logger, mapping.Name, DeviceText(mapping, null), group.Name, e.Message);
                RemoveJournal(group.Name);
                group.Dispose();
            }
        }

        return null;
    }

    /// <summary>
    /// Takes a journal group out of systemd's store: its first <paramref name="members"/> (all by default; the store
    /// logs a failure).
    /// </summary>
    private void RemoveJournal(string group, int? members = null)
    {
        foreach (string member in JournalMembers.Take(members ?? JournalDescriptors))
        {
            _store.Remove(group + "/" + member);
        }
    }

    /// <summary>
    /// Puts a new journal's group into systemd's store, in the room <see cref="CreateJournal"/> reserved: from here on a
    /// kill of this process leaves the next one all it needs to carry on. False, with the room given up and what was
    /// stored taken out, when the store refused.
    /// </summary>
    private bool StoreJournal(MappingOptions mapping, string device, string group, Socket relayEnd, Socket kernelEnd, RelayJournal journal)
    {
        SafeHandle[] members = [relayEnd.SafeHandle, kernelEnd.SafeHandle, journal.File];
        int stored = 0;
        try
        {
            for (; stored < members.Length; stored++)
            {
                _store.Store(group + "/" + JournalMembers[stored], members[stored]);
            }

            RelayLog.JournalKept(_logger, mapping.Name, device, group);
            return true;
        }
#pragma warning disable CA1031 // Not kept: logged, and the relay carries on without crash protection.
        catch (Exception e)
#pragma warning restore CA1031
        {
            RemoveJournal(group, stored);
            Unreserve(members.Length - stored);
            RelayLog.JournalNotKept(_logger, mapping.Name, device, "passing it to systemd failed: " + e.Message);
            return false;
        }
    }

    /// <summary>A new group's name: "nbd-journal/NAME/" and 12 random hex digits, unique across restarts.</summary>
    private static string NewJournalName(MappingOptions mapping) =>
        JournalPrefix(mapping) + Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(6));

    /// <summary>
    /// Where a mapping's journal groups are in systemd's store: not under <see cref="DescriptorPrefix"/>, whose every name
    /// an earlier build takes as a relay end (a rollback would otherwise relay on a group's kernel end).
    /// </summary>
    private static string JournalPrefix(MappingOptions mapping) => "nbd-journal/" + mapping.Name + "/";

    /// <summary>
    /// The relay over <paramref name="relayEnd"/>; with <paramref name="journal"/> a journaled one (started, or recovered
    /// when the journal comes from a predecessor), which owns <paramref name="driverEnd"/> and the journal too.
    /// </summary>
    /// <exception cref="InvalidDataException">The journal cannot be recovered from (everything given is disposed).</exception>
    /// <exception cref="SocketException">Our end failed during the recovery (likewise).</exception>
    private NbdRelay CreateRelay(MappingOptions mapping, INbdSession first, Socket relayEnd, RelaySession session, Socket? driverEnd = null, RelayJournal? journal = null)
    {
        NbdRelayOptions options = new()
        {
            Reconnect = ct => ReconnectAsync(mapping, first.Export, session, ct),
            // Ioctl allows Timeout 0 (the driver never times a request out): the relay still stops trying at some point.
            GiveUpAfter = mapping.Timeout > TimeSpan.Zero ? mapping.Timeout : MappingOptions.DefaultTimeout,
            RetryInterval = RetryInterval,
            IsPermanent = e => e is ExportChangedException,
            Events = e =>
            {
                if (e is NbdRelayJournalAbandoned)
                {
                    session.DropJournal();
                }

                Log(mapping, session.Device, e);
            },
            Name = "nbd-relay " + mapping.Name,
            TimeProvider = time,
        };
        NbdRelay relay = journal is null ? new NbdRelay(relayEnd, first.Socket, options) : NbdRelay.Journaled(relayEnd, driverEnd!, journal, first.Socket, options);
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

    /// <summary>Whether <paramref name="mapping"/> carries its kernel connections across processes (a relay on a netlink device; an ioctl device dies with the process that served it).</summary>
    public static bool IsResumable(MappingOptions mapping) => mapping.Relay && mapping.Interface == KernelInterface.Netlink;

    /// <summary>
    /// The prefixes of the names under which <paramref name="mapping"/> takes descriptors back from systemd's store
    /// (journal groups, and relay ends handed over without one); none when it takes none.
    /// </summary>
    public static IReadOnlyList<string> ResumablePrefixes(MappingOptions mapping) =>
        IsResumable(mapping) ? [JournalPrefix(mapping), DescriptorPrefix(mapping)] : [];

    /// <summary>
    /// A journaled relay's hand-over: its group is in systemd's store already, so the relay only stops between two
    /// requests with every reply delivered (which leaves a successor nothing to resend), or, when replies are still
    /// owed after <see cref="HandOverLimit"/>, where it is (the successor resends them, as after a kill). True when the
    /// group stays for the next start.
    /// </summary>
    private bool HandOverJournaled(MappingOptions mapping, RelaySession session, Socket kernelEnd, NbdRelay relay, string group)
    {
        string device = DeviceText(mapping, session.Device);
        try
        {
            // While no process reads, the driver's sends block once the pair's buffer is full, and give the connection
            // up after SO_SNDTIMEO (it set the request timeout there).
            NbdSocketTimeout.Set(kernelEnd, MappingLoop.HandOverTimeout);
        }
        catch (NbdKernelException e)
        {
            RelayLog.NotHandedOver(_logger, e, mapping.Name, device, "the kernel's end refused SO_SNDTIMEO: " + e.Message);
            return false;
        }

        try
        {
            // The group is stored already: nothing to pass on, unless the journal was abandoned meanwhile (a request
            // larger than its ring during the wait), which took the group out of the store.
            if (relay.TryHandOver(HandOverLimit, _ =>
            {
                if (relay.JournalAbandoned)
                {
                    throw new InvalidOperationException("its journal was abandoned during the hand-over (a request larger than the ring)");
                }
            }))
            {
                RelayLog.HandedOverJournaled(_logger, mapping.Name, device, group);
                return true;
            }
        }
        catch (InvalidOperationException e)
        {
            RelayLog.NotHandedOver(_logger, null, mapping.Name, device, e.Message);
            return false;
        }

        // Replies still owed (a server that stopped answering): the journal carries them over as it would a kill's.
        int owed = relay.InFlight;
        if (relay.TryDetach(string.Create(CultureInfo.InvariantCulture, $"stopped with {owed} requests unanswered, its journal kept")))
        {
            RelayLog.DetachedJournaled(_logger, mapping.Name, device, owed, HandOverLimit.TotalSeconds, group);
            return true;
        }

        RelayLog.NotHandedOver(_logger, null, mapping.Name, device, WhyNotHandedOver(relay));
        return false;
    }

    /// <summary>Why <see cref="NbdRelay.TryHandOver"/> returned false, for event 115.</summary>
    private static string WhyNotHandedOver(NbdRelay relay) => relay.Completion.IsCompleted
        ? "the relay had ended"
        : string.Create(CultureInfo.InvariantCulture, $"{relay.InFlight} requests still unanswered after {HandOverLimit.TotalSeconds:0.###} s");

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
                _store.Store(name, end.SafeHandle);
                stored = true;
            }))
            {
                RelayLog.HandedOver(_logger, mapping.Name, device, name);
            }
            else
            {
                RelayLog.NotHandedOver(_logger, null, mapping.Name, device, WhyNotHandedOver(relay));
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
            case NbdRelayJournalAbandoned abandoned:
                RelayLog.JournalAbandoned(_logger, mapping.Name, device, abandoned.Reason);
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
    /// A journal group taken from systemd's store: the relay's end and the kernel's end of the pair, and the journal's
    /// memfd, owned until they go to a relay (as duplicates), back to the store, or are closed.
    /// </summary>
    private sealed record JournalGroup(string Name, SafeFileHandle RelayEnd, SafeFileHandle KernelEnd, SafeFileHandle Journal) : IDisposable
    {
        public SafeFileHandle[] Descriptors => [RelayEnd, KernelEnd, Journal];

        public void Dispose()
        {
            RelayEnd.Dispose();
            KernelEnd.Dispose();
            Journal.Dispose();
        }
    }

    /// <summary>A Socket over a descriptor someone else owns and closes (disposing it leaves the descriptor open).</summary>
    private static Socket View(SafeHandle descriptor) => new(new SafeSocketHandle(descriptor.DangerousGetHandle(), ownsHandle: false));

    /// <summary>
    /// The session MappingLoop sees: its socket is the kernel's end of the pair; disposing it stops the relay and closes
    /// every server connection the relay used.
    /// A resumed session has no kernel end to offer (the kernel holds it already): its socket is the relay's end, which
    /// shows the connection's end to a watch just as well, and shutting it down ends the kernel's connection the same way.
    /// A journaled session has its group in systemd's store while it relays (a new one from <see cref="Serves"/>, a
    /// resumed one from the start) and takes it out when it ends, unless a stop handed it over.
    /// </summary>
    private sealed class RelaySession : INbdSession
    {
        private readonly Lock _lock = new();
        private readonly List<INbdSession> _connections;
        private readonly RelayingConnector _owner;
        private readonly MappingOptions _mapping;
        private readonly INbdSession _first;
        private readonly Socket? _kernelEnd;
        private readonly Socket _relayEnd;
        private readonly string? _takenName;

        /// <summary>A resumed journal's group (its relay works on duplicates); null otherwise.</summary>
        private readonly JournalGroup? _taken;

        /// <summary>The kernel's end of a resumed journal's group, for its socket options (not owned).</summary>
        private readonly Socket? _takenKernelView;

        /// <summary>A new session's journal: the relay owns it once started; kept here for its memfd.</summary>
        private readonly RelayJournal? _journal;

        /// <summary>A new journal's room in systemd's store, reserved and not used (by <see cref="Serves"/>) yet.</summary>
        private bool _roomReserved;

        /// <summary>The group in systemd's store this session takes out when it ends; null when there is none (left).</summary>
        private string? _group;

        /// <summary>A stop handed the group over: it stays in the store.</summary>
        private bool _kept;

        private NbdRelay? _relay;
        private bool _disposed;
        private string? _device;
        private bool _ending;
        private volatile bool _shutDown;

        /// <summary>A new pair (<paramref name="kernelEnd"/> set, <paramref name="journal"/> when the store has room for it), or an end handed over without a journal.</summary>
        public RelaySession(RelayingConnector owner, MappingOptions mapping, INbdSession first, Socket? kernelEnd, Socket relayEnd, string? takenName, RelayJournal? journal)
        {
            _owner = owner;
            _mapping = mapping;
            _first = first;
            _connections = [first];
            _kernelEnd = kernelEnd;
            _relayEnd = relayEnd;
            _takenName = takenName;
            _journal = journal;
            _roomReserved = journal is not null;
        }

        /// <summary>A journal group a predecessor left in systemd's store.</summary>
        public RelaySession(RelayingConnector owner, MappingOptions mapping, INbdSession first, JournalGroup taken)
        {
            _owner = owner;
            _mapping = mapping;
            _first = first;
            _connections = [first];
            _taken = taken;
            _group = taken.Name;
            _relayEnd = View(taken.RelayEnd);
            _takenKernelView = View(taken.KernelEnd);
        }

        public ExportDescription Export => _first.Export;

        public Socket Socket => _kernelEnd ?? _relayEnd;

        public bool Resumed => _kernelEnd is null;

        public bool CanHandOver => Volatile.Read(ref _relay) is { Completion.IsCompleted: false } && _owner._store.CanStore;

        /// <summary>The device for the relay's log lines; null until the mapping serves.</summary>
        public string? Device => Volatile.Read(ref _device);

        public void Serves(string device)
        {
            Volatile.Write(ref _device, device);
            if (_taken is not null)
            {
                ResumeJournaled(device);
            }
            else if (Resumed && Start())
            {
                RelayLog.Resumed(_owner._logger, _mapping.Name, device);
            }
            else if (!Resumed)
            {
                KeepJournal(device);
            }
        }

        /// <summary>
        /// A resumed journal's relay: recovers from where the predecessor stopped or was killed. A journal it cannot
        /// recover from ends the kernel's connection (the driver resends after its timeout) and leaves the store.
        /// </summary>
        private void ResumeJournaled(string device)
        {
            RelayRecovery? recovered;
            try
            {
                recovered = Start() ? Volatile.Read(ref _relay)?.Recovered : null;
            }
#pragma warning disable CA1031 // Whatever Journaled threw, it shut our end down: the group is dead, never to be returned.
            catch (Exception e)
#pragma warning restore CA1031
            {
                RelayLog.JournalRefused(_owner._logger, _mapping.Name, device, _taken!.Name, e.Message);
                Shutdown();
                lock (_lock)
                {
                    if (_group is not null)
                    {
                        _owner.RemoveJournal(_group);
                        _group = null;
                    }
                }

                return;
            }

            if (recovered is null)
            {
                return;
            }

            RelayLog.ResumedJournaled(_owner._logger, _mapping.Name, device, _taken!.Name, recovered.Pending, recovered.Finished, recovered.Delivered);

            // The driver set the kernel end's SO_SNDTIMEO to its request timeout; a stop that handed the group over
            // raised it to the hand-over's. Back to the mapping's, as the adoption did for the device.
            if (_mapping.Timeout > TimeSpan.Zero)
            {
                try
                {
                    NbdSocketTimeout.Set(_takenKernelView!, _mapping.Timeout);
                }
                catch (NbdKernelException e)
                {
                    RelayLog.SendTimeoutNotReset(_owner._logger, _mapping.Name, device, e.Message);
                }
            }
        }

        /// <summary>
        /// The relay abandoned its journal (a request larger than the ring): a successor would refuse it, so the group
        /// leaves the store (a crash then ends the kernel's connection, as without a journal) and a stop hands the
        /// relay's end over alone.
        /// </summary>
        public void DropJournal()
        {
            lock (_lock)
            {
                if (_roomReserved)
                {
                    _roomReserved = false;
                    _owner.Unreserve(JournalDescriptors);
                }

                if (_group is not null && !_kept)
                {
                    _owner.RemoveJournal(_group);
                    _group = null;
                }
            }
        }

        /// <summary>
        /// A new journal's group into systemd's store, once the kernel took the pair's end (a group whose end the kernel
        /// never took would make the next start carry on a connection no device uses).
        /// </summary>
        private void KeepJournal(string device)
        {
            lock (_lock)
            {
                if (!_roomReserved || _ending || _journal is null || _relay is not { Completion.IsCompleted: false })
                {
                    return;
                }

                _roomReserved = false;
                string group = NewJournalName(_mapping);
                if (_owner.StoreJournal(_mapping, device, group, _relayEnd, _kernelEnd!, _journal))
                {
                    _group = group;
                }
            }
        }

        /// <summary>Creates and starts the relay over the session's end; false when it was started already.</summary>
        /// <exception cref="InvalidDataException">A journal the relay cannot go on from (everything it was given is disposed).</exception>
        public bool Start()
        {
            NbdRelay relay;
            lock (_lock)
            {
                if (_relay is not null || _ending)
                {
                    return false;
                }

                relay = _taken is { } taken ? StartFrom(taken)
                    : _journal is { } journal ? _owner.CreateRelay(_mapping, _first, _relayEnd, this, UnixDescriptorPassing.DuplicateStreamSocket(_kernelEnd!.SafeHandle), journal)
                    : _owner.CreateRelay(_mapping, _first, _relayEnd, this);
                _relay = relay;

                // Under the lock, so that a Dispose never meets a relay created but not started (it would not wait
                // for threads that start afterwards on closed sockets). The relay's threads take the lock only later.
                relay.Start();
            }

            return true;
        }

        /// <summary>A journaled relay over duplicates of <paramref name="taken"/> (the group stays as it is for the store).</summary>
        private NbdRelay StartFrom(JournalGroup taken)
        {
            Socket? relayEnd = null;
            Socket? kernelEnd = null;
            try
            {
                relayEnd = UnixDescriptorPassing.DuplicateStreamSocket(taken.RelayEnd);
                kernelEnd = UnixDescriptorPassing.DuplicateStreamSocket(taken.KernelEnd);
                RelayJournal journal = RelayJournal.Open(UnixDescriptorPassing.Duplicate(taken.Journal));
                return _owner.CreateRelay(_mapping, _first, relayEnd, this, kernelEnd, journal);
            }
            catch
            {
                // Journaled disposes what it was given itself; disposing again does no harm.
                relayEnd?.Dispose();
                kernelEnd?.Dispose();
                throw;
            }
        }

        public void HandOver(int slot)
        {
            NbdRelay? relay = Volatile.Read(ref _relay);
            string? group;
            lock (_lock)
            {
                group = _group;
            }

            if (relay is null)
            {
                return;
            }

            if (group is not null)
            {
                bool kept = _owner.HandOverJournaled(_mapping, this, _kernelEnd ?? _takenKernelView!, relay, group);
                lock (_lock)
                {
                    _kept = kept;
                }
            }
            else
            {
                _owner.HandOver(_mapping, this, _kernelEnd ?? _takenKernelView, relay, slot);
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
            string? group;
            lock (_lock)
            {
                first = !_ending;
                _ending = true;
                relay = _relay;
                group = _kept ? null : _group;
                _group = null;
                if (_roomReserved)
                {
                    // Under the lock: DropJournal, on a relay thread, may give the room up at the same time.
                    _roomReserved = false;
                    _owner.Unreserve(JournalDescriptors);
                }
            }

            if (!first)
            {
                return;
            }

            // A group never relayed on goes back untouched (unless Shutdown ended the kernel's connection); any other
            // leaves the store, before this disposal shuts the relay's end down (a relay that gave up, or a LINK_DEAD's
            // Shutdown, did so already: systemd drops a stored socket that hangs up, and a group missing a member is
            // never taken).
            bool returned = relay is null && _taken is not null && group is not null && !_shutDown;
            if (group is not null && !returned)
            {
                _owner.RemoveJournal(group);
            }

            if (relay is not null)
            {
                relay.Dispose(); // closes our end too (a resumed journal's relay: its duplicates)
            }
            else if (_taken is null)
            {
                // Never relayed on. A taken end goes back untouched, unless Shutdown ended the kernel's connection.
                if (_takenName is not null && !_shutDown)
                {
                    _owner.GiveBack(_mapping, Device, _takenName, _relayEnd);
                }
                else
                {
                    _relayEnd.Dispose();
                }

                _journal?.Dispose(); // never given to a relay
            }

            if (_taken is not null)
            {
                _relayEnd.Dispose(); // views: the descriptors are the group's
                _takenKernelView!.Dispose();
                if (returned)
                {
                    _owner._store.ReturnGroup(_taken.Name, JournalMembers, _taken.Descriptors);
                    RelayLog.GivenBack(_owner._logger, _mapping.Name, DeviceText(_mapping, Device), _taken.Name);
                }
                else
                {
                    _taken.Dispose();
                }
            }

            _kernelEnd?.Dispose();
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

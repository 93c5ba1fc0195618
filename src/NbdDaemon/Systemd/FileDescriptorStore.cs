using System.Globalization;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using Nbd.Kernel;

namespace NbdDaemon.Systemd;

/// <summary>
/// systemd's file descriptor store for this service (sd_notify "FDSTORE=1", the unit's FileDescriptorStoreMax=):
/// descriptors given to it outlive the process and come back to the next one through $LISTEN_FDS / $LISTEN_FDNAMES
/// when the service restarts (a restart job or Restart=). A full stop empties it. The relay keeps the kernel's
/// connection alive across a restart this way (<see cref="Mappings.Linux.RelayingConnector"/>).
/// </summary>
internal interface IFileDescriptorStore
{
    /// <summary>Whether <see cref="Store"/> can work at all: run by systemd, with a store it did not disable.</summary>
    bool CanStore { get; }

    /// <summary>
    /// Room for one more descriptor, held until <see cref="Store"/> uses it or <see cref="Unreserve"/> gives it up; false
    /// when the unit's store is full. systemd closes a descriptor beyond FileDescriptorStoreMax= with nothing but a line in
    /// its own log, so a hand-over must know before it stops the relay, not find out from a connection that died.
    /// </summary>
    bool TryReserve();

    /// <summary>Gives up a <see cref="TryReserve"/> no <see cref="Store"/> used.</summary>
    void Unreserve();

    /// <summary>What the store holds at most, for messages ("FDSTORE=128"); null when systemd did not say (before 254).</summary>
    int? Capacity { get; }

    /// <summary>Gives systemd a descriptor for <paramref name="descriptor"/> (a socket, a memfd) under <paramref name="name"/>, in the room a <see cref="TryReserve"/> made.</summary>
    /// <exception cref="NbdKernelException">The notification socket refused the datagram.</exception>
    void Store(string name, SafeHandle descriptor);

    /// <summary>
    /// An inherited descriptor named <paramref name="prefix"/> + a suffix without '/' (a '/' marks a member of a group,
    /// <see cref="TakeGroup"/>), with its name, removed from systemd's store before it is returned (so a later start never
    /// gets it again); null when there is none (left).
    /// </summary>
    (string Name, Socket Socket)? Take(string prefix);

    /// <summary>
    /// The inherited descriptors of one group: named GROUP/MEMBER for each of <paramref name="members"/>, GROUP starting
    /// with <paramref name="prefix"/> and without a '/' after it. They are returned in the order of
    /// <paramref name="members"/>, close-on-exec and owned by the caller, and are left in systemd's store: a group is
    /// what a successor needs should this process be killed while it uses them (the relay's journal); <see cref="Remove"/>
    /// takes them out. Groups missing a member are left for <see cref="ReleaseUnclaimed"/>. Null when no group is whole.
    /// </summary>
    (string Group, SafeFileHandle[] Descriptors)? TakeGroup(string prefix, IReadOnlyList<string> members);

    /// <summary>
    /// Puts back, for a later <see cref="TakeGroup"/> in this process, a group <see cref="TakeGroup"/> returned and
    /// nobody used: it never left systemd's store. Takes ownership of <paramref name="descriptors"/>; never throws.
    /// </summary>
    void ReturnGroup(string group, IReadOnlyList<string> members, SafeFileHandle[] descriptors);

    /// <summary>
    /// Takes <paramref name="name"/> out of systemd's store (FDSTOREREMOVE: every descriptor of that name) and frees
    /// the room it held; false, with the reason logged, when the notification socket refused. Never throws.
    /// </summary>
    bool Remove(string name);

    /// <summary>
    /// Gives back a descriptor <see cref="Take"/> returned and nobody read from or wrote to: into systemd's store again
    /// under <paramref name="name"/> (so a stop from here on leaves it to the next start, as before it was taken) and
    /// to a later <see cref="Take"/> in this process. Takes ownership of <paramref name="socket"/>; never throws.
    /// </summary>
    void GiveBack(string name, Socket socket);

    /// <summary>
    /// Removes from systemd's store and closes the inherited descriptors not taken yet whose name <paramref name="which"/>
    /// selects; returns their names. Those it does not select stay, in the store too (a stop leaves them to the next start).
    /// </summary>
    IReadOnlyList<string> ReleaseUnclaimed(Func<string, bool> which);
}

/// <summary>The store over $NOTIFY_SOCKET and the descriptors inherited at start (<see cref="FromEnvironment"/>).</summary>
internal sealed class SystemdFileDescriptorStore : IFileDescriptorStore
{
    /// <summary>sd_listen_fds(3): inherited descriptors start here.</summary>
    public const int ListenFdsStart = 3;

    private readonly string? _notifySocket;
    private readonly int? _capacity;
    private readonly ILogger _logger;
    private readonly Lock _lock = new();
    private readonly List<Entry> _inherited;

    /// <summary>
    /// Descriptors in systemd's store as far as this process knows: those it inherited (they stay in the store until
    /// removed), plus those it stored or reserved room for, less those it removed.
    /// </summary>
    private int _held;

    /// <param name="notifySocket">$NOTIFY_SOCKET; null or empty when not run by systemd.</param>
    /// <param name="capacity">$FDSTORE: the unit's FileDescriptorStoreMax=, 0 for none; null when systemd did not say.</param>
    /// <param name="inherited">The descriptors $LISTEN_FDS passed, by name.</param>
    /// <param name="logger">For descriptors refused or left over.</param>
    public SystemdFileDescriptorStore(string? notifySocket, int? capacity, IEnumerable<(string Name, int Fd)> inherited, ILogger logger)
    {
        _notifySocket = string.IsNullOrEmpty(notifySocket) ? null : notifySocket;
        _capacity = capacity;
        _inherited = [.. inherited.Select(i => new Entry(i.Name, i.Fd, null))];
        _held = _inherited.Count;
        _logger = logger;
    }

    public bool CanStore => _notifySocket is not null && _capacity is not 0;

    public int? Capacity => _capacity;

    public bool TryReserve()
    {
        lock (_lock)
        {
            if (!CanStore || _held >= _capacity)
            {
                return false;
            }

            _held++;
            return true;
        }
    }

    public void Unreserve()
    {
        lock (_lock)
        {
            _held = Math.Max(0, _held - 1);
        }
    }

    /// <summary>The names of the inherited descriptors not taken yet.</summary>
    public IReadOnlyList<string> Inherited
    {
        get
        {
            lock (_lock)
            {
                return [.. _inherited.Select(i => i.Name)];
            }
        }
    }

    /// <summary>
    /// Reads $NOTIFY_SOCKET (unusable is unset: <see cref="NotifySocket.Problem"/>), $FDSTORE (systemd 254+ sets it to the
    /// store's size when the unit has one, and leaves it unset otherwise; earlier versions never set it, so unset cannot
    /// mean "none" here: the unit we ship has FileDescriptorStoreMax=128) and $LISTEN_PID,
    /// $LISTEN_FDS, $LISTEN_FDNAMES (only when LISTEN_PID is this process, as sd_listen_fds(3) does). Unnamed
    /// descriptors are called "unknown", as systemd does.
    /// </summary>
    public static SystemdFileDescriptorStore FromEnvironment(Func<string, string?> getVariable, int processId, ILogger logger)
    {
        var inherited = new List<(string, int)>();
        if (getVariable("LISTEN_PID") == processId.ToString(CultureInfo.InvariantCulture)
            && int.TryParse(getVariable("LISTEN_FDS"), NumberStyles.None, CultureInfo.InvariantCulture, out int count) && count is > 0 and < 4096)
        {
            string[] names = getVariable("LISTEN_FDNAMES")?.Split(':') ?? [];
            for (int i = 0; i < count; i++)
            {
                inherited.Add((i < names.Length && names[i].Length > 0 ? names[i] : "unknown", ListenFdsStart + i));
            }
        }

        int? capacity = int.TryParse(getVariable("FDSTORE"), NumberStyles.None, CultureInfo.InvariantCulture, out int size) ? size : null;
        return new SystemdFileDescriptorStore(NotifySocket.Usable(getVariable), capacity, inherited, logger);
    }

    public void Store(string name, SafeHandle descriptor)
    {
        if (!CanStore)
        {
            throw new InvalidOperationException(_notifySocket is null ? "not run by systemd (no NOTIFY_SOCKET)" : "the unit has no file descriptor store (FileDescriptorStoreMax=0)");
        }

        UnixDescriptorPassing.Send(_notifySocket!, "FDSTORE=1\nFDNAME=" + name, descriptor);
    }

    public (string Name, Socket Socket)? Take(string prefix)
    {
        while (true)
        {
            Entry entry;
            lock (_lock)
            {
                int index = _inherited.FindIndex(i => i.Name.StartsWith(prefix, StringComparison.Ordinal) && i.Name.IndexOf('/', prefix.Length) < 0);
                if (index < 0)
                {
                    return null;
                }

                entry = _inherited[index];
                _inherited.RemoveAt(index);
            }

            // Out of the store first: a descriptor that stayed in it would come back to the next start after this
            // process had read from it, in the middle of a request.
            if (!TryRemoveFromStore(entry.Name))
            {
                entry.Close();
                continue;
            }

            if (entry.Owner is Socket givenBack)
            {
                return (entry.Name, givenBack);
            }

            try
            {
                return (entry.Name, UnixDescriptorPassing.AdoptInheritedStreamSocket(entry.Fd));
            }
            catch (NbdKernelException e)
            {
                SystemdLog.InheritedRefused(_logger, entry.Name, e.Message);
                entry.Close();
            }
        }
    }

    public (string Group, SafeFileHandle[] Descriptors)? TakeGroup(string prefix, IReadOnlyList<string> members)
    {
        while (true)
        {
            List<Entry> group;
            string name;
            lock (_lock)
            {
                string? whole = _inherited.Select(i => GroupOf(i.Name, prefix)).OfType<string>()
                    .FirstOrDefault(g => members.All(m => _inherited.Any(i => i.Name == g + "/" + m)));
                if (whole is null)
                {
                    return null;
                }

                name = whole;
                group = [.. members.Select(m => _inherited.First(i => i.Name == whole + "/" + m))];
                _inherited.RemoveAll(group.Contains);
            }

            var taken = new List<SafeFileHandle>();
            try
            {
                foreach (Entry entry in group)
                {
                    taken.Add(entry.Owner as SafeFileHandle ?? UnixDescriptorPassing.AdoptInherited(entry.Fd));
                }

                return (name, [.. taken]);
            }
            catch (NbdKernelException e)
            {
                // Not usable as a whole: out of the store, or every later start would stumble on it again.
                SystemdLog.InheritedRefused(_logger, name, e.Message);
                taken.ForEach(t => t.Dispose());
                foreach (Entry entry in group.Skip(taken.Count))
                {
                    entry.Close();
                }

                foreach (Entry entry in group)
                {
                    Remove(entry.Name);
                }
            }
        }
    }

    public void ReturnGroup(string group, IReadOnlyList<string> members, SafeFileHandle[] descriptors)
    {
        lock (_lock)
        {
            for (int i = 0; i < members.Count; i++)
            {
                _inherited.Add(new Entry(group + "/" + members[i], (int)descriptors[i].DangerousGetHandle(), descriptors[i]));
            }
        }
    }

    public bool Remove(string name) => TryRemoveFromStore(name);

    /// <summary>GROUP when <paramref name="name"/> is GROUP/MEMBER with GROUP starting with <paramref name="prefix"/>; else null.</summary>
    private static string? GroupOf(string name, string prefix)
    {
        if (!name.StartsWith(prefix, StringComparison.Ordinal))
        {
            return null;
        }

        int slash = name.IndexOf('/', prefix.Length);
        return slash > prefix.Length && name.IndexOf('/', slash + 1) < 0 ? name[..slash] : null;
    }

    public void GiveBack(string name, Socket socket)
    {
        // Into systemd's store first: from here on a stop leaves it to the next start. If that fails it is still kept
        // for this process (which would otherwise close it, ending the kernel's connection at once).
        if (CanStore)
        {
            if (!TryReserve())
            {
                SystemdLog.GiveBackFailed(_logger, name, string.Create(CultureInfo.InvariantCulture, $"the store is full: FileDescriptorStoreMax={_capacity}"));
            }
            else
            {
                try
                {
                    Store(name, socket.SafeHandle);
                }
                catch (NbdKernelException e)
                {
                    Unreserve();
                    SystemdLog.GiveBackFailed(_logger, name, e.Message);
                }
            }
        }

        lock (_lock)
        {
            _inherited.Add(new Entry(name, (int)socket.Handle, socket));
        }
    }

    public IReadOnlyList<string> ReleaseUnclaimed(Func<string, bool> which)
    {
        List<Entry> left;
        lock (_lock)
        {
            left = [.. _inherited.Where(i => which(i.Name))];
            _inherited.RemoveAll(i => which(i.Name));
        }

        foreach (Entry entry in left)
        {
            TryRemoveFromStore(entry.Name);
            entry.Close();
            SystemdLog.InheritedUnclaimed(_logger, entry.Name);
        }

        return [.. left.Select(l => l.Name)];
    }

    /// <summary>
    /// A descriptor held for a <see cref="Take"/> or <see cref="TakeGroup"/>: inherited (a bare descriptor), or given back
    /// (its owner: a socket, a group's handle).
    /// </summary>
    private sealed record Entry(string Name, int Fd, IDisposable? Owner)
    {
        public void Close()
        {
            if (Owner is not null)
            {
                Owner.Dispose();
            }
            else
            {
                UnixDescriptorPassing.Close(Fd);
            }
        }
    }

    private bool TryRemoveFromStore(string name)
    {
        if (_notifySocket is null)
        {
            return true; // not run by systemd: there is no store to leave it in
        }

        try
        {
            UnixDescriptorPassing.Send(_notifySocket, "FDSTOREREMOVE=1\nFDNAME=" + name, descriptor: null);
            Unreserve();
            return true;
        }
        catch (NbdKernelException e)
        {
            SystemdLog.StoreRemoveFailed(_logger, name, e.Message);
            return false;
        }
    }
}

internal static partial class SystemdLog
{
    [LoggerMessage(EventId = 120, Level = LogLevel.Warning, Message = "Inherited descriptor {Name} not used: {Reason}")]
    public static partial void InheritedRefused(ILogger logger, string name, string reason);

    [LoggerMessage(EventId = 121, Level = LogLevel.Information, Message = "Inherited descriptor {Name} claimed by no mapping: closed and removed from systemd's file descriptor store")]
    public static partial void InheritedUnclaimed(ILogger logger, string name);

    [LoggerMessage(EventId = 122, Level = LogLevel.Warning, Message = "Inherited descriptor {Name} not used: removing it from systemd's file descriptor store failed ({Reason}); a later start could get it back mid-stream")]
    public static partial void StoreRemoveFailed(ILogger logger, string name, string reason);

    [LoggerMessage(EventId = 125, Level = LogLevel.Warning, Message = "Descriptor {Name} could not go back to systemd's file descriptor store ({Reason}): kept for this process only, a stop now closes it")]
    public static partial void GiveBackFailed(ILogger logger, string name, string reason);
}

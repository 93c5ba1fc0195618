using System.Collections.Concurrent;
using System.Net.Sockets;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Time.Testing;
using NbdDaemon.Configuration;
using Nbd.Protocol;
using NbdDaemon.Mappings;

namespace NbdDaemon.Tests.Mappings;

/// <summary>
/// A fake clock that also counts the timers armed on it, by due time. A test advances the clock only once the code
/// under test armed the timer it means to fire: a timer armed after the advance would fall due a whole interval later,
/// and the test would wait for nothing.
/// </summary>
internal sealed class ArmedTimeProvider() : FakeTimeProvider(new DateTimeOffset(2026, 1, 1, 0, 0, 0, TimeSpan.Zero))
{
    private readonly ConcurrentDictionary<TimeSpan, int> _armed = new();

    /// <summary>How many timers were armed with <paramref name="dueTime"/> so far.</summary>
    public int Armed(TimeSpan dueTime) => _armed.GetValueOrDefault(dueTime);

    public override ITimer CreateTimer(TimerCallback callback, object? state, TimeSpan dueTime, TimeSpan period)
    {
        ITimer timer = base.CreateTimer(callback, state, dueTime, period);
        _armed.AddOrUpdate(dueTime, 1, (_, n) => n + 1);
        return timer;
    }
}

internal static class TestMappings
{
    public static MappingOptions Create(
        string name = "data", KernelInterface kernelInterface = KernelInterface.Ioctl, string? device = "/dev/nbd3",
        ReconnectOptions? reconnect = null, int connections = 1, bool readOnly = false, TimeSpan? timeout = null,
        StopAction onStop = StopAction.Disconnect) => new()
        {
            Name = name,
            Uri = "nbd://127.0.0.1:10809/" + name,
            Endpoint = new MappingEndpoint("127.0.0.1:10809", name),
            Device = device,
            Interface = kernelInterface,
            Connections = connections,
            ReadOnly = readOnly,
            Timeout = timeout ?? TimeSpan.FromSeconds(30),
            DeadConnectionTimeout = kernelInterface == KernelInterface.Netlink ? MappingOptions.DefaultDeadConnectionTimeout : null,
            OnStop = onStop,
            Reconnect = reconnect ?? new ReconnectOptions(true, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(60), 0),
        };

    public static MappingLoop Loop(MappingOptions options, FakeConnector connector, FakeKernel kernel, TimeProvider time, Func<double>? random = null) =>
        new(options, connector, kernel, time, NullLogger.Instance, random ?? (() => 1.0));

    /// <summary>Polls <paramref name="condition"/> every 5 ms; 10 s at most.</summary>
    public static async Task WaitUntilAsync(Func<bool> condition)
    {
        using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        while (!condition())
        {
            await Task.Delay(5, deadline.Token);
        }
    }
}

internal sealed class FakeSession : INbdSession
{
    public FakeSession(ExportDescription export)
    {
        Export = export;
    }

    public ExportDescription Export { get; }

    public Socket Socket { get; } = new(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);

    public bool Disposed { get; private set; }

    public bool ShutDown { get; private set; }

    public void Shutdown() => ShutDown = true;

    /// <summary>What <see cref="INbdSession.Serves"/> was last told.</summary>
    public string? Served { get; private set; }

    public void Serves(string device) => Served = device;

    /// <summary>Plays a relay connection the previous process handed over (<see cref="INbdSession.Resumed"/>).</summary>
    public bool Resumed { get; init; }

    /// <summary>The slots <see cref="INbdSession.HandOver"/> was called with, and whether it came before Dispose.</summary>
    public List<(int Slot, bool BeforeDispose)> HandOvers { get; } = [];

    public bool CanHandOver { get; init; }

    /// <summary>How many "nl-timeout" operations the kernel had recorded when the first hand-over came.</summary>
    public int? TimeoutOpsBeforeHandOver { get; private set; }

    public FakeKernel? Kernel { get; init; }

    /// <summary>How long <see cref="HandOver"/> blocks, as a relay waiting for the replies it still owes the kernel.</summary>
    public TimeSpan HandOverDelay { get; init; }

    /// <summary>Whether <see cref="HandOver"/> ran on a thread-pool thread (which a stop of every mapping can exhaust).</summary>
    public bool HandedOverOnPoolThread { get; private set; }

    public void HandOver(int slot)
    {
        HandedOverOnPoolThread |= Thread.CurrentThread.IsThreadPoolThread;
        Thread.Sleep(HandOverDelay);
        TimeoutOpsBeforeHandOver ??= Kernel?.Operations.Count(o => o.StartsWith("nl-timeout", StringComparison.Ordinal));
        HandOvers.Add((slot, !Disposed));
    }

    public void Dispose()
    {
        Disposed = true;
        Socket.Dispose();
    }
}

/// <summary>Connector whose behaviour per call is scripted: each call dequeues the next handler (the last one repeats).</summary>
internal sealed class FakeConnector : INbdConnector
{
    private readonly List<Func<CancellationToken, Task<INbdSession>>> _script = [];
    private int _calls;

    public static readonly ExportDescription DefaultExport = new("data", 1UL << 30, ExportDescription.FlagHasFlags | ExportDescription.FlagCanMultiConn);

    public ConcurrentQueue<FakeSession> Sessions { get; } = new();

    public int Calls => Volatile.Read(ref _calls);

    public FakeConnector Then(Func<CancellationToken, Task<INbdSession>> step)
    {
        _script.Add(step);
        return this;
    }

    public FakeConnector ThenServe(ExportDescription? export = null, bool canHandOver = false, FakeKernel? kernel = null, TimeSpan handOverDelay = default) => Then(_ =>
    {
        var session = new FakeSession(export ?? DefaultExport) { CanHandOver = canHandOver, Kernel = kernel, HandOverDelay = handOverDelay };
        Sessions.Enqueue(session);
        return Task.FromResult<INbdSession>(session);
    });

    /// <summary>A session that carries on a connection handed over by the previous process.</summary>
    public FakeConnector ThenResume(ExportDescription? export = null) => Then(_ =>
    {
        var session = new FakeSession(export ?? DefaultExport) { Resumed = true };
        Sessions.Enqueue(session);
        return Task.FromResult<INbdSession>(session);
    });

    public FakeConnector ThenRefuse() => Then(_ => Task.FromException<INbdSession>(new SocketException((int)SocketError.ConnectionRefused)));

    public FakeConnector ThenHang() => Then(async ct =>
    {
        await Task.Delay(Timeout.Infinite, ct);
        throw new InvalidOperationException("unreachable");
    });

    public Task<INbdSession> ConnectAsync(MappingOptions mapping, CancellationToken cancellationToken)
    {
        int call = Interlocked.Increment(ref _calls) - 1;
        return _script[Math.Min(call, _script.Count - 1)](cancellationToken);
    }
}

/// <summary>Records every kernel operation as text, in order, across devices and netlink.</summary>
internal sealed class FakeKernel : INbdKernel
{
    private readonly ConcurrentQueue<string> _operations = new();

    private readonly ConcurrentDictionary<Socket, TimeSpan> _sendTimeouts = new();

    public List<FakeDevice> Devices { get; } = [];

    public FakeNetlink? Netlink { get; private set; }

    /// <summary>Netlink-configured devices by index: what survives the daemon (sockets held by the kernel).</summary>
    public ConcurrentDictionary<int, FakeNetlinkDevice> NetlinkDevices { get; } = new();

    /// <summary>Extra /sys/block entries (devices not configured through <see cref="NetlinkDevices"/>).</summary>
    public ConcurrentDictionary<int, KernelDeviceInfo> SysfsOnly { get; } = new();

    /// <summary>Thrown by every <see cref="FakeDevice.SetSocket"/> (e.g. the driver's EBUSY for another client's device).</summary>
    public Exception? SetSocketFailure { get; set; }

    /// <summary>Thrown by every <see cref="FakeDevice.Disconnect"/>, NBD_DO_IT left running (a disconnect stuck in the driver).</summary>
    public Exception? DisconnectFailure { get; set; }

    public Action<string>? OnOperation { get; set; }

    public IReadOnlyList<string> Operations => [.. _operations];

    public void Record(string operation)
    {
        _operations.Enqueue(operation);
        OnOperation?.Invoke(operation);
    }

    /// <summary>An unused device is the first of nbd7, nbd8, … that <paramref name="mayUse"/> allows.</summary>
    public IIoctlDevice OpenDevice(string? path, Func<int, bool>? mayUse = null)
    {
        Record("open " + (path ?? "unused"));
        path ??= "/dev/nbd" + Enumerable.Range(7, 9).First(i => mayUse?.Invoke(i) != false).ToString(System.Globalization.CultureInfo.InvariantCulture);
        var device = new FakeDevice(this, path);
        Devices.Add(device);
        return device;
    }

    /// <summary>How many of the next <see cref="OpenNetlink"/> calls fail (as under the memory pressure behind ENOBUFS).</summary>
    public int OpenNetlinkFailures { get; set; }

    public INbdNetlinkControl OpenNetlink()
    {
        if (OpenNetlinkFailures > 0)
        {
            OpenNetlinkFailures--;
            Record("netlink open failed");
            throw new SocketException((int)SocketError.NoBufferSpaceAvailable);
        }

        Record("netlink open");
        Netlink = new FakeNetlink(this);
        return Netlink;
    }

    public IReadOnlyList<int> ListDevices() => [.. NetlinkDevices.Keys.Concat(SysfsOnly.Keys).Distinct().Order()];

    public KernelDeviceInfo? ReadDevice(int index) =>
        NetlinkDevices.TryGetValue(index, out FakeNetlinkDevice? device) ? device.Sysfs
        : SysfsOnly.TryGetValue(index, out KernelDeviceInfo? info) ? info
        : null;

    public void ClearSendTimeout(Socket socket) => _sendTimeouts[socket] = TimeSpan.Zero;

    public TimeSpan ReadSendTimeout(Socket socket) => _sendTimeouts.TryGetValue(socket, out TimeSpan value) ? value : TimeSpan.Zero;

    /// <summary>Devices open in another process without a configuration: sysfs shows them free, CONNECT fails EBUSY.</summary>
    public HashSet<int> OpenedElsewhere { get; } = [];

    /// <summary>Mapping locks held (by backend identifier), with the pid shown to a second taker.</summary>
    public ConcurrentDictionary<string, int> Locks { get; } = new();

    /// <summary>"lock NAME", "lock refused NAME", "unlock NAME" in order (kept out of <see cref="Operations"/>, which are the driver's).</summary>
    public ConcurrentQueue<string> LockEvents { get; } = new();

    /// <summary>queue/max_sectors_kb per device index; 128 (the driver's default) for a device not listed.</summary>
    public ConcurrentDictionary<int, uint> MaxSectorsKb { get; } = new();

    /// <summary>Thrown by <see cref="LimitRequestSize"/> when set (sysfs read-only under a sandbox, say).</summary>
    public Exception? LimitRequestSizeFailure { get; set; }

    public (uint Before, uint After) LimitRequestSize(int index, uint maxBytes)
    {
        Record($"limit-request {index} {maxBytes}");
        if (LimitRequestSizeFailure is { } failure)
        {
            throw failure;
        }

        uint before = MaxSectorsKb.GetValueOrDefault(index, 128u);
        uint after = Math.Min(before, maxBytes / 1024);
        MaxSectorsKb[index] = after;
        return (before, after);
    }

    public bool RestoreRequestSize(int index, uint expectedKb, uint restoreKb)
    {
        Record($"restore-request {index} {expectedKb} {restoreKb}");
        if (MaxSectorsKb.GetValueOrDefault(index, 128u) != expectedKb)
        {
            return false;
        }

        MaxSectorsKb[index] = restoreKb;
        return true;
    }

    /// <summary>Like the abstract socket name: one holder; released by disposing, as by the holder's exit.</summary>
    public IDisposable LockMapping(string backendIdentifier)
    {
        if (!Locks.TryAdd(backendIdentifier, Environment.ProcessId))
        {
            LockEvents.Enqueue("lock refused " + backendIdentifier);
            throw new MappingInUseException($"mapping is run by another nbd-daemon process (pid {Locks[backendIdentifier]})", Locks[backendIdentifier]);
        }

        LockEvents.Enqueue("lock " + backendIdentifier);
        return new FakeLock(this, backendIdentifier);
    }

    private sealed class FakeLock(FakeKernel kernel, string name) : IDisposable
    {
        private int _disposed;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
            {
                kernel.Locks.TryRemove(name, out _);
                kernel.LockEvents.Enqueue("unlock " + name);
            }
        }
    }

    /// <summary>What nbd_start_device / nbd_reconnect_socket do to a socket they take.</summary>
    public void Take(Socket socket, TimeSpan timeout) => _sendTimeouts[socket] = timeout;

    private readonly ConcurrentDictionary<Socket, string> _ended = new();
    private readonly List<FakeSocketWatch> _watches = [];

    /// <summary>Watches started so far (not part of <see cref="Operations"/>).</summary>
    public int WatchesStarted { get; private set; }

    /// <summary>Watches not yet disposed.</summary>
    public int WatchesActive
    {
        get
        {
            lock (_watches)
            {
                return _watches.Count;
            }
        }
    }

    /// <summary>When set, <see cref="WatchSockets"/> throws it (e.g. EMFILE).</summary>
    public Exception? WatchFailure { get; set; }

    public ISocketWatch WatchSockets(IReadOnlyList<Socket> sockets)
    {
        if (WatchFailure is { } failure)
        {
            throw failure;
        }

        var watch = new FakeSocketWatch(this, sockets);
        lock (_watches)
        {
            WatchesStarted++;
            _watches.Add(watch);
        }

        foreach (Socket socket in sockets)
        {
            if (_ended.TryGetValue(socket, out string? how))
            {
                watch.Notify(socket, how);
            }
        }

        return watch;
    }

    /// <summary>The connection of <paramref name="socket"/> ends (peer close, error, or the driver's shutdown).</summary>
    public void EndSocket(Socket socket, string how = "connection closed or shut down")
    {
        _ended[socket] = how;
        FakeSocketWatch[] watches;
        lock (_watches)
        {
            watches = [.. _watches];
        }

        foreach (FakeSocketWatch watch in watches)
        {
            watch.Notify(socket, how);
        }
    }

    internal void Forget(FakeSocketWatch watch)
    {
        lock (_watches)
        {
            _watches.Remove(watch);
        }
    }

    /// <summary>A device an earlier daemon left configured, with <paramref name="slots"/> connections, the first <paramref name="deadSlots"/> dead.</summary>
    public FakeNetlinkDevice LeaveDevice(
        int index, ulong size, string? backend, int slots = 1, int deadSlots = 0, bool readOnly = false, uint logicalBlockSize = 4096, TransmissionFlags sends = 0)
    {
        var device = new FakeNetlinkDevice(index, size, backend, TimeSpan.FromSeconds(30), slots, readOnly, logicalBlockSize, sends);
        for (int i = 0; i < deadSlots; i++)
        {
            device.Dead[i] = true;
        }

        NetlinkDevices[index] = device;
        return device;
    }
}

/// <summary>One netlink device as the driver keeps it: a slot per connection, dead or alive.</summary>
internal sealed class FakeNetlinkDevice(
    int index, ulong size, string? backend, TimeSpan timeout, int slots, bool readOnly = false, uint logicalBlockSize = 4096, TransmissionFlags sends = 0)
{
    public int Index { get; } = index;

    public TimeSpan Timeout { get; } = timeout;

    public bool[] Dead { get; } = new bool[slots];

    /// <summary>The socket in each slot, when known (null for a device left by an earlier daemon).</summary>
    public Socket?[] Sockets { get; } = new Socket?[slots];

    public KernelDeviceInfo Sysfs { get; } = new(index, size, logicalBlockSize, backend, Connected: true, readOnly) { Sends = sends };

    public void MarkDead(int slot) => Dead[slot] = true;
}

internal sealed class FakeDevice : IIoctlDevice
{
    private readonly FakeKernel _kernel;

    public FakeDevice(FakeKernel kernel, string path)
    {
        _kernel = kernel;
        Path = path;
    }

    public string Path { get; }

    public FakeServiceLoop? Loop { get; private set; }

    public List<Socket> Sockets { get; } = [];

    public ulong Size { get; private set; }

    public ushort Flags { get; private set; }

    public uint BlockSize { get; private set; }

    public void SetBlockSize(uint blockSize)
    {
        BlockSize = blockSize;
        _kernel.Record($"blksize {blockSize}");
    }

    public void SetSizeBytes(ulong size)
    {
        Size = size;
        _kernel.Record($"size {size}");
    }

    public void SetFlags(ushort flags)
    {
        Flags = flags;
        _kernel.Record($"flags {flags}");
    }

    public void SetTimeout(TimeSpan timeout) => _kernel.Record($"timeout {timeout.TotalSeconds}");

    public void SetSocket(Socket socket)
    {
        if (_kernel.SetSocketFailure is { } failure)
        {
            _kernel.Record("set-sock refused");
            throw failure;
        }

        Sockets.Add(socket);
        _kernel.Record("set-sock");
    }

    public INbdServiceLoop StartServiceLoop(string name)
    {
        _kernel.Record("do-it " + name);
        Loop = new FakeServiceLoop(_kernel, this);
        return Loop;
    }

    public void ClearQueue() => _kernel.Record("clear-que");

    public void Disconnect()
    {
        _kernel.Record("disconnect");
        if (_kernel.DisconnectFailure is { } failure)
        {
            throw failure;
        }

        Loop?.End();
    }

    public void ClearSocket()
    {
        Sockets.Clear();
        _kernel.Record("clear-sock");
    }

    public void Dispose() => _kernel.Record("close " + Path);
}

internal sealed class FakeServiceLoop : INbdServiceLoop
{
    private readonly FakeKernel _kernel;
    private readonly TaskCompletionSource _done = new(TaskCreationOptions.RunContinuationsAsynchronously);

    private readonly FakeDevice _device;

    public FakeServiceLoop(FakeKernel kernel, FakeDevice device)
    {
        _kernel = kernel;
        _device = device;
    }

    public Task Completion => _done.Task;

    /// <summary>The connection died (or NBD_DISCONNECT took effect): NBD_DO_IT returns.</summary>
    public void End() => _done.TrySetResult();

    /// <summary>As <c>IoctlDevice</c>'s: NBD_DISCONNECT then NBD_CLEAR_SOCK on the device.</summary>
    public void Stop()
    {
        _kernel.Record("loop-stop");
        _device.Disconnect();
        _device.ClearSocket();
    }
}

internal sealed class FakeNetlink : INbdNetlinkControl
{
    private readonly FakeKernel _kernel;
    private readonly Lock _lock = new();
    private TaskCompletionSource _linkDead = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private bool _pending;
    private readonly List<Socket> _shutDownOnEvent = [];

    public FakeNetlink(FakeKernel kernel)
    {
        _kernel = kernel;
    }

    public NetlinkConnectParameters? LastConnect { get; private set; }

    public bool FailReconfigure { get; set; }

    public bool EventsLost { get; private set; }

    /// <summary>Like NetlinkControl's reader failing (ENOBUFS): every wait for LINK_DEAD fails, now and from now on.</summary>
    public void LoseEvents()
    {
        lock (_lock)
        {
            EventsLost = true;
            _linkDead.TrySetException(new MappingException("lost the netlink event subscription: ENOBUFS"));
        }
    }

    public int Connect(NetlinkConnectParameters parameters)
    {
        ClearPending();
        LastConnect = parameters;
        // The kernel's own pick: the first index from 5 that has no configuration.
        int index = parameters.Index ?? Enumerable.Range(5, 100).First(i => !_kernel.NetlinkDevices.ContainsKey(i));
        _kernel.Record($"nl-connect {index} size {parameters.SizeBytes} socks {parameters.Sockets.Count} id {parameters.BackendIdentifier}");
        bool anotherClients = _kernel.NetlinkDevices.TryGetValue(index, out FakeNetlinkDevice? existing) && existing.Sysfs.Backend != parameters.BackendIdentifier;
        if (_kernel.OpenedElsewhere.Contains(index) || anotherClients)
        {
            throw new Nbd.Kernel.NbdKernelException($"/dev/nbd{index}", "NBD_CMD_CONNECT", 16 /* EBUSY */, "nbd already in use");
        }

        var device = new FakeNetlinkDevice(
            index, parameters.SizeBytes, parameters.BackendIdentifier, parameters.Timeout, parameters.Sockets.Count,
            sends: (TransmissionFlags)parameters.ServerFlags & ExportChangedException.FlagsTheKernelUses);
        _kernel.NetlinkDevices[index] = device;
        for (int slot = 0; slot < parameters.Sockets.Count; slot++)
        {
            device.Sockets[slot] = parameters.Sockets[slot];
            _kernel.Take(parameters.Sockets[slot], parameters.Timeout);
        }

        return index;
    }

    /// <summary>Like nbd_reconnect_socket: each socket takes the first dead slot; one with no dead slot is dropped, no error.</summary>
    public void Reconfigure(int index, IReadOnlyList<Socket> sockets, string backendIdentifier)
    {
        ClearPending();
        _kernel.Record($"nl-reconfigure {index} socks {sockets.Count} id {backendIdentifier}");
        if (FailReconfigure)
        {
            throw new IOException("ENOENT");
        }

        FakeNetlinkDevice device = _kernel.NetlinkDevices[index];
        // Like nbd_genl_reconfigure: compared only when the device was connected with an identifier.
        if (device.Sysfs.Backend is not null && device.Sysfs.Backend != backendIdentifier)
        {
            throw new IOException("EINVAL: backend identifier differs");
        }

        foreach (Socket socket in sockets)
        {
            int slot = Array.IndexOf(device.Dead, true);
            if (slot >= 0)
            {
                device.Dead[slot] = false;
                device.Sockets[slot] = socket;
                _kernel.Take(socket, device.Timeout);
            }
        }
    }

    public void SetTimeout(int index, TimeSpan timeout, string backendIdentifier)
    {
        _kernel.Record(string.Create(System.Globalization.CultureInfo.InvariantCulture, $"nl-timeout {index} {timeout.TotalSeconds:0.###} s id {backendIdentifier}"));
        if (_kernel.NetlinkDevices[index].Sysfs.Backend != backendIdentifier)
        {
            throw new IOException("EINVAL: backend identifier differs");
        }
    }

    private void ClearPending()
    {
        lock (_lock)
        {
            _pending = false;
        }
    }

    public void Disconnect(int index)
    {
        _kernel.Record($"nl-disconnect {index}");
        _kernel.NetlinkDevices.TryRemove(index, out _);
    }

    /// <summary>Like NetlinkControl: an event raised before anyone waits is kept until CONNECT/RECONFIGURE.</summary>
    public async Task WaitForLinkDeadAsync(int index, CancellationToken cancellationToken)
    {
        TaskCompletionSource current;
        lock (_lock)
        {
            current = _pending ? CompletedSource() : _linkDead;
            if (EventsLost && !current.Task.IsFaulted)
            {
                current = new TaskCompletionSource();
                current.SetException(new MappingException("lost the netlink event subscription: ENOBUFS"));
            }
        }

        await current.Task.WaitAsync(cancellationToken);
        Socket[] shutDown;
        lock (_lock)
        {
            _pending = false;
            shutDown = [.. _shutDownOnEvent];
            _shutDownOnEvent.Clear();
        }

        _kernel.Record($"nl-link-dead {index}");
        foreach (Socket socket in shutDown)
        {
            _kernel.EndSocket(socket);
        }
    }

    private static TaskCompletionSource CompletedSource()
    {
        var done = new TaskCompletionSource();
        done.SetResult();
        return done;
    }

    /// <summary>
    /// LINK_DEAD; <paramref name="slots"/> (default: all) of every device are marked dead first, and their sockets
    /// are shut down (as nbd_mark_nsock_dead does) once the event was seen, so the loop learns of it by the event.
    /// </summary>
    public void RaiseLinkDead(params int[] slots)
    {
        foreach (FakeNetlinkDevice device in _kernel.NetlinkDevices.Values)
        {
            foreach (int slot in slots.Length == 0 ? Enumerable.Range(0, device.Dead.Length) : slots)
            {
                device.MarkDead(slot);
                if (device.Sockets[slot] is { } socket)
                {
                    lock (_lock)
                    {
                        _shutDownOnEvent.Add(socket);
                    }
                }
            }
        }

        RaiseLinkDeadEventOnly();
    }

    /// <summary>The event alone, no slot marked dead (a stale or spurious LINK_DEAD).</summary>
    public void RaiseLinkDeadEventOnly()
    {
        TaskCompletionSource old;
        lock (_lock)
        {
            _pending = true;
            old = _linkDead;
            _linkDead = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        }

        old.TrySetResult();
    }

    public void Dispose() => _kernel.Record("netlink close");
}

/// <summary>Like NbdSocketWatch: completes with the first watched socket whose connection ended.</summary>
internal sealed class FakeSocketWatch(FakeKernel kernel, IReadOnlyList<Socket> sockets) : ISocketWatch
{
    private readonly TaskCompletionSource<string> _ended = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public Task<string> Ended => _ended.Task;

    public IReadOnlyList<Socket> Sockets { get; } = sockets;

    public void Notify(Socket socket, string how)
    {
        int index = Sockets.ToList().IndexOf(socket);
        if (index >= 0)
        {
            _ended.TrySetResult($"socket {index + 1} of {Sockets.Count}: {how}");
        }
    }

    public void Dispose()
    {
        kernel.Forget(this);
        _ended.TrySetCanceled();
    }
}

/// <summary>
/// One <see cref="MappingLoop"/> running on the thread pool for a test, with its recorded states. Disposing stops it and
/// waits for its end without throwing, so a test that failed half-way does not leave its loop running on.
/// </summary>
internal sealed class RunningLoop : IAsyncDisposable
{
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(10);
    private readonly CancellationTokenSource _stop = new();
    private readonly StateRecorder _states;
    private readonly Task _run;

    private RunningLoop(MappingLoop loop, Action<MappingState>? onChange)
    {
        _states = new StateRecorder(loop, onChange);
        _run = Task.Run(() => loop.RunAsync(_stop.Token));
    }

    public IReadOnlyList<MappingState> States => _states.States;

    /// <summary>Starts <paramref name="loop"/>; <paramref name="onChange"/> runs on the loop's flow at each state.</summary>
    public static RunningLoop Start(MappingLoop loop, Action<MappingState>? onChange = null) => new(loop, onChange);

    public Task WaitForAsync(MappingState state, int occurrence = 1) => _states.WaitForAsync(state, occurrence);

    public Task WaitForAsync(Func<IReadOnlyList<MappingState>, bool> condition, string what) => _states.WaitForAsync(condition, what);

    /// <summary>The stop a host would request (the token <see cref="MappingLoop.RunAsync"/> got is cancelled).</summary>
    public Task RequestStopAsync() => _stop.CancelAsync();

    /// <summary>Waits (10 s at most) for the loop to end, and throws what it threw.</summary>
    public Task EndedAsync() => _run.WaitAsync(Deadline);

    /// <summary>Requests the stop, then <see cref="EndedAsync"/>.</summary>
    public async Task StopAsync()
    {
        await RequestStopAsync();
        await EndedAsync();
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        // The test's own assertions already said what went wrong; this only keeps the loop from outliving it.
        await _run.WaitAsync(Deadline).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        _stop.Dispose();
    }
}

/// <summary>Collects a loop's state changes and lets a test wait for one, always with a deadline.</summary>
internal sealed class StateRecorder
{
    private readonly Lock _lock = new();
    private readonly List<MappingState> _states = [];
    private readonly List<(Func<IReadOnlyList<MappingState>, bool> Condition, TaskCompletionSource Done)> _waiters = [];

    public StateRecorder(MappingLoop loop, Action<MappingState>? onChange = null)
    {
        loop.StateChanged += (_, state) =>
        {
            lock (_lock)
            {
                _states.Add(state);
                foreach (var waiter in _waiters.Where(w => w.Condition(_states)).ToList())
                {
                    waiter.Done.TrySetResult();
                    _waiters.Remove(waiter);
                }
            }

            onChange?.Invoke(state);
        };
    }

    public IReadOnlyList<MappingState> States
    {
        get
        {
            lock (_lock)
            {
                return [.. _states];
            }
        }
    }

    public Task WaitForAsync(MappingState state, int occurrence = 1) =>
        WaitForAsync(s => s.Count(x => x == state) >= occurrence, $"{state} #{occurrence}");

    public async Task WaitForAsync(Func<IReadOnlyList<MappingState>, bool> condition, string what)
    {
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        lock (_lock)
        {
            if (condition(_states))
            {
                return;
            }

            _waiters.Add((condition, done));
        }

        try
        {
            await done.Task.WaitAsync(TimeSpan.FromSeconds(10));
        }
        catch (TimeoutException)
        {
            throw new TimeoutException($"waited 10 s for {what}; states so far: {string.Join(", ", States)}");
        }
    }
}

using System.Net.Sockets;

namespace NbdDaemon.Mappings;

/// <summary>
/// The Linux nbd driver as the state machine needs it. Integration seam over <c>Nbd.Kernel</c>:
/// <see cref="OpenDevice"/> = <c>NbdDevice.Open(path)</c> / <c>NbdDevice.OpenUnused()</c>,
/// <see cref="OpenNetlink"/> = <c>NbdNetlink.Open()</c> + <c>NbdNetlinkEvents.Subscribe()</c>.
/// Kernel failures (<c>NbdKernelException</c>) may pass through unchanged: they are retried with backoff.
/// </summary>
internal interface INbdKernel
{
    /// <param name="path">/dev/nbdN, or null for the first unused device.</param>
    /// <param name="mayUse">With a null path: asked about each unused device, in index order, before it is opened.</param>
    IIoctlDevice OpenDevice(string? path, Func<int, bool>? mayUse = null);

    INbdNetlinkControl OpenNetlink();

    /// <summary>Indexes of every /dev/nbdN the driver has (sysfs), ascending.</summary>
    IReadOnlyList<int> ListDevices();

    /// <summary>What sysfs says about nbd<paramref name="index"/>; null when there is no such device.</summary>
    KernelDeviceInfo? ReadDevice(int index);

    /// <summary>Sets SO_SNDTIMEO of <paramref name="socket"/> to zero before it is handed to the kernel.</summary>
    void ClearSendTimeout(Socket socket);

    /// <summary>
    /// SO_SNDTIMEO as the kernel has it: the driver sets it to the request timeout on every socket it takes
    /// (CONNECT and RECONFIGURE), so after <see cref="ClearSendTimeout"/> a non-zero value means "taken".
    /// </summary>
    TimeSpan ReadSendTimeout(Socket socket);

    /// <summary>
    /// Watches sockets the kernel took for the end of their connection (peer close, error, or the driver shutting
    /// it down as it marks it dead), through duplicates of the descriptors: <c>Nbd.Kernel.NbdSocketWatch</c>.
    /// </summary>
    ISocketWatch WatchSockets(IReadOnlyList<Socket> sockets);

    /// <summary>
    /// Caps the block layer's requests for nbd<paramref name="index"/> at <paramref name="maxBytes"/> (lowers
    /// queue/max_sectors_kb, never raises it): <c>Nbd.Kernel.NbdSysfs.LimitRequestSize</c>. Returns the limit before and
    /// after, in KiB.
    /// </summary>
    (uint Before, uint After) LimitRequestSize(int index, uint maxBytes);

    /// <summary>
    /// Puts back the request size <see cref="LimitRequestSize"/> found (<paramref name="restoreKb"/>) if the device still
    /// has the one it set (<paramref name="expectedKb"/>): <c>Nbd.Kernel.NbdSysfs.RestoreRequestSize</c>.
    /// </summary>
    bool RestoreRequestSize(int index, uint expectedKb, uint restoreKb);

    /// <summary>
    /// The host-wide lock of one mapping (by its backend identifier), held until disposed or the process ends:
    /// <c>Linux.MappingLock</c>. Throws <see cref="MappingInUseException"/> when another process holds it.
    /// </summary>
    IDisposable LockMapping(string backendIdentifier);
}

/// <summary>A running <see cref="INbdKernel.WatchSockets"/>; disposing it stops watching (the sockets stay open).</summary>
internal interface ISocketWatch : IDisposable
{
    /// <summary>Completes with e.g. "socket 1 of 2: the server closed the connection" when the first socket ends.</summary>
    Task<string> Ended { get; }
}

/// <summary>/sys/block/nbdN as adoption needs it (mirrors <c>Nbd.Kernel.NbdDeviceStatus</c>).</summary>
/// <param name="Index">N.</param>
/// <param name="SizeBytes">sysfs <c>size</c> × 512.</param>
/// <param name="LogicalBlockSize">queue/logical_block_size; 0 when unknown.</param>
/// <param name="Backend">The backend identifier given at CONNECT, or null.</param>
/// <param name="Connected">The device has a configuration (sysfs <c>pid</c> present).</param>
/// <param name="ReadOnly">sysfs <c>ro</c>.</param>
internal sealed record KernelDeviceInfo(int Index, ulong SizeBytes, uint LogicalBlockSize, string? Backend, bool Connected, bool ReadOnly)
{
    public string Path => Nbd.Kernel.NbdKernel.DevicePath(Index);

    /// <summary><c>Nbd.Kernel.NbdDeviceStatus.IsInUse</c> over these fields: set up by some client.</summary>
    public bool InUse => Connected || SizeBytes != 0;

    /// <summary>
    /// The commands the device's queue attributes have the driver send the server: SendFlush (<c>write_cache</c> is
    /// write back), SendFua (<c>fua</c>), SendTrim (<c>discard_max_bytes</c> above 0), SendWriteZeroes
    /// (<c>write_zeroes_max_bytes</c> above 0). The driver sets them from the flags it was configured with.
    /// </summary>
    public Nbd.Protocol.TransmissionFlags Sends { get; init; }
}

/// <summary>One /dev/nbdN driven by ioctls; same names as <c>Nbd.Kernel.NbdDevice</c>.</summary>
internal interface IIoctlDevice : IDisposable
{
    string Path { get; }

    void SetBlockSize(uint blockSize);

    void SetSizeBytes(ulong size);

    void SetFlags(ushort flags);

    void SetTimeout(TimeSpan timeout);

    void SetSocket(Socket socket);

    /// <summary>Starts NBD_DO_IT on a dedicated thread.</summary>
    INbdServiceLoop StartServiceLoop(string name);

    void ClearQueue();

    void Disconnect();

    void ClearSocket();
}

/// <summary>The thread sitting in NBD_DO_IT. <see cref="Completion"/> ends when the kernel lets go of the sockets.</summary>
internal interface INbdServiceLoop
{
    Task Completion { get; }

    /// <summary>Marks the end as requested, so the kernel library does not report it as a failure.</summary>
    void Stop();
}

/// <summary>Parameters of NBD_CMD_CONNECT (nbd-netlink.h); mirrors <c>NbdNetlinkConnectRequest</c>.</summary>
internal sealed record NetlinkConnectParameters(
    int? Index,
    ulong SizeBytes,
    uint BlockSize,
    TimeSpan Timeout,
    TimeSpan? DeadConnectionTimeout,
    ushort ServerFlags,
    IReadOnlyList<Socket> Sockets,
    string BackendIdentifier);

/// <summary>The generic-netlink nbd family plus its multicast LINK_DEAD events.</summary>
internal interface INbdNetlinkControl : IDisposable
{
    /// <returns>The device index the kernel used.</returns>
    int Connect(NetlinkConnectParameters parameters);

    /// <summary>
    /// NBD_CMD_RECONFIGURE: hands new sockets to a device whose connection died. Each socket fills a dead slot;
    /// one with no dead slot left is silently dropped by the kernel (check with <see cref="INbdKernel.ReadSendTimeout"/>).
    /// </summary>
    /// <param name="index">Device index.</param>
    /// <param name="sockets">Negotiated sockets.</param>
    /// <param name="backendIdentifier">Must repeat the one given at CONNECT (also by an earlier process).</param>
    void Reconfigure(int index, IReadOnlyList<Socket> sockets, string backendIdentifier);

    /// <summary>
    /// NBD_CMD_RECONFIGURE with NBD_ATTR_TIMEOUT only: the request timeout of requests the kernel starts from now on
    /// (those in flight keep the deadline they got).
    /// </summary>
    void SetTimeout(int index, TimeSpan timeout, string backendIdentifier);

    void Disconnect(int index);

    /// <summary>
    /// The event subscription failed (every wait then fails at once): the control must be replaced by a new one, which
    /// subscribes afresh.
    /// </summary>
    bool EventsLost { get; }

    /// <summary>
    /// Completes when NBD_CMD_LINK_DEAD arrives for <paramref name="index"/>. An event that arrived before the wait
    /// counts (until CONNECT/RECONFIGURE); the wait that sees an event consumes it.
    /// </summary>
    Task WaitForLinkDeadAsync(int index, CancellationToken cancellationToken);
}

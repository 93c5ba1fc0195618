namespace NbdDaemon.Configuration;

/// <summary>Which kernel interface configures the device.</summary>
internal enum KernelInterface
{
    /// <summary>Classic ioctls on /dev/nbdN; the daemon keeps a thread inside NBD_DO_IT while serving.</summary>
    Ioctl,

    /// <summary>The generic-netlink <c>nbd</c> family; the kernel owns the sockets, reconnect via RECONFIGURE.</summary>
    Netlink,
}

/// <summary>What stopping the daemon does to a mapping's device (<c>Nbd:Mappings:N:OnStop</c>).</summary>
internal enum StopAction
{
    /// <summary>Clear the queue and disconnect the device (ioctl NBD_DISCONNECT, netlink NBD_CMD_DISCONNECT).</summary>
    Disconnect,

    /// <summary>
    /// Netlink only: leave the device configured and serving on the kernel's sockets; just close the daemon's
    /// descriptors. The next start re-adopts it by its backend identifier.
    /// </summary>
    Leave,
}

/// <summary>Reconnect policy of one mapping (section <c>Nbd:Mappings:N:Reconnect</c>).</summary>
/// <param name="Enabled">When false the first failure ends the mapping (state GaveUp).</param>
/// <param name="InitialDelay">Base delay before the first retry.</param>
/// <param name="MaxDelay">Cap of the exponential backoff.</param>
/// <param name="MaxAttempts">Consecutive failed attempts before giving up; 0 = retry forever.</param>
internal sealed record ReconnectOptions(bool Enabled, TimeSpan InitialDelay, TimeSpan MaxDelay, int MaxAttempts)
{
    public static readonly ReconnectOptions Default = new(true, TimeSpan.FromSeconds(1), TimeSpan.FromMinutes(1), 0);
}

/// <summary>One validated entry of <c>Nbd:Mappings</c>. Built only by <see cref="NbdConfigurationReader"/>.</summary>
internal sealed record MappingOptions
{
    public const int MaxConnections = 16;
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(30);

    /// <summary>
    /// Netlink default for <see cref="Timeout"/>. With a dead-connection timeout a request timeout is never an error
    /// there: the kernel marks the connection dead, the daemon reconnects and the request is resent. What it does
    /// bound is the stall of a request that was in flight when the connection died, which is resent only when its
    /// timeout fires (measured: stall after the server is back ≈ Timeout − outage). 10 s keeps that short and still
    /// leaves a slow server ten seconds per request before it costs a reconnect.
    /// </summary>
    public static readonly TimeSpan DefaultNetlinkTimeout = TimeSpan.FromSeconds(10);

    /// <summary>Netlink default for <see cref="DeadConnectionTimeout"/>: long enough to ride out a server or daemon restart.</summary>
    public static readonly TimeSpan DefaultDeadConnectionTimeout = TimeSpan.FromSeconds(120);

    /// <summary>Default for <see cref="KeepAlive"/>.</summary>
    public static readonly TimeSpan DefaultKeepAlive = TimeSpan.FromSeconds(30);

    /// <summary>Smallest non-zero <see cref="KeepAlive"/>: the probes are counted in whole seconds.</summary>
    public static readonly TimeSpan MinimumKeepAlive = TimeSpan.FromSeconds(3);

    /// <summary>
    /// Largest <see cref="KeepAlive"/>, 18:12:15: the idle time (half of it, in whole seconds) must stay within Linux's
    /// TCP_KEEPIDLE limit of 32767 s (MAX_TCP_KEEPIDLE), or every connect fails with EINVAL.
    /// </summary>
    public static readonly TimeSpan MaximumKeepAlive = TimeSpan.FromSeconds((2 * 32767) + 1);

    public required string Name { get; init; }
    public required string Uri { get; init; }

    /// <summary>Server and export derived from <see cref="Uri"/>, for logs and status.</summary>
    public required MappingEndpoint Endpoint { get; init; }

    /// <summary>/dev/nbdN, or null to let the kernel side pick an unused device.</summary>
    public string? Device { get; init; }

    public KernelInterface Interface { get; init; } = KernelInterface.Ioctl;

    /// <summary>Configured block size, or null for "server's preferred if usable, else 4096".</summary>
    public uint? BlockSize { get; init; }

    /// <summary>Kernel request timeout; also the deadline of one connect + handshake attempt.</summary>
    public TimeSpan Timeout { get; init; } = DefaultTimeout;

    /// <summary>Netlink only (null for ioctl): how long the kernel queues I/O while waiting for a RECONFIGURE.</summary>
    public TimeSpan? DeadConnectionTimeout { get; init; }

    public StopAction OnStop { get; init; } = StopAction.Disconnect;

    /// <summary>
    /// TCP only: how long a silent connection (server host gone, network partitioned: no FIN, no RST) may stay
    /// unnoticed; zero turns keepalive off. See <c>Mappings.Linux.TcpKeepAlive</c>.
    /// </summary>
    public TimeSpan KeepAlive { get; init; } = DefaultKeepAlive;

    /// <summary>
    /// The kernel gets one end of a socket pair and the daemon relays to the server, hiding a lost server connection
    /// from the driver (reconnect + resend within <see cref="Timeout"/>). See <c>Mappings.Linux.RelayingConnector</c>.
    /// </summary>
    public bool Relay { get; init; }

    public int Connections { get; init; } = 1;
    public bool ReadOnly { get; init; }
    public ReconnectOptions Reconnect { get; init; } = ReconnectOptions.Default;

    /// <summary>Netlink backend identifier; stable per mapping so the kernel (and udev) can tell us apart.</summary>
    public string BackendIdentifier => "nbd-daemon:" + Name;
}

/// <summary>Where a mapping's export lives, in words a person reads in the journal.</summary>
/// <param name="Server">host:port, or the unix socket path.</param>
/// <param name="Export">Export name (may be empty: the server's default export).</param>
internal sealed record MappingEndpoint(string Server, string Export);

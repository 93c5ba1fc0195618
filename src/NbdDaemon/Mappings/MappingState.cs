namespace NbdDaemon.Mappings;

/// <summary>States of one mapping; see <see cref="MappingLoop"/> for the transitions.</summary>
internal enum MappingState
{
    /// <summary>Created, loop not started.</summary>
    Idle,

    /// <summary>Opening the connection(s) and running the NBD handshake.</summary>
    Connecting,

    /// <summary>Agreeing to the export: unchanged size/writability, block size, connection count.</summary>
    Negotiating,

    /// <summary>Handing sockets and geometry to the kernel (ioctls, netlink CONNECT or RECONFIGURE).</summary>
    ConfiguringKernel,

    /// <summary>The device serves I/O; waiting for the service loop to end or LINK_DEAD.</summary>
    Serving,

    /// <summary>Waiting out the backoff delay before the next attempt.</summary>
    Reconnecting,

    /// <summary>Stop requested: clear queue, disconnect, clear socket.</summary>
    Stopping,

    /// <summary>Stopped on request. Terminal.</summary>
    Stopped,

    /// <summary>Reconnect disabled or MaxAttempts consecutive failures. Terminal; the device was released.</summary>
    GaveUp,

    /// <summary>A permanent failure (or a bug) ended the mapping. Terminal; the device was released.</summary>
    Failed,
}

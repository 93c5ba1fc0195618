using System.Net.Sockets;

namespace Nbd.Kernel;

/// <summary>NBD_CMD_CONNECT: configure a device and start it in one request (the kernel owns it afterwards).</summary>
public sealed record NbdNetlinkConnectRequest
{
    /// <summary>Device index, or null to let the kernel pick a free device (creating one if none is free).</summary>
    public int? Index { get; init; }

    /// <summary>Export size in bytes (required by the kernel).</summary>
    public ulong SizeBytes { get; init; }

    /// <summary>Power of two 512..page size; 0 leaves the kernel default (1024).</summary>
    public uint BlockSize { get; init; }

    /// <summary>Per-request timeout, whole seconds; null keeps the default (30 s).</summary>
    public TimeSpan? Timeout { get; init; }

    /// <summary>Raw transmission flags from the handshake (NBD_FLAG_*).</summary>
    public ushort ServerFlags { get; init; }

    /// <summary>NBD_CFLAG_DESTROY_ON_DISCONNECT (1), NBD_CFLAG_DISCONNECT_ON_CLOSE (2); see <see cref="NbdClientFlags"/>.</summary>
    public ulong ClientFlags { get; init; }

    /// <summary>How long I/O waits for RECONFIGURE to supply a new socket after all died (whole seconds); null = fail at once.</summary>
    public TimeSpan? DeadConnectionTimeout { get; init; }

    /// <summary>Connected TCP or unix stream sockets, handshake done; more than one needs NBD_FLAG_CAN_MULTI_CONN.</summary>
    public required IReadOnlyList<Socket> Sockets { get; init; }

    /// <summary>Shown in /sys/block/nbdN/backend; lets a later process recognise its device after a restart.</summary>
    public string? BackendIdentifier { get; init; }
}

/// <summary>
/// NBD_CMD_RECONFIGURE on a running netlink device. Null members are left as they are, except that the kernel
/// rewrites both client flags whenever <see cref="ClientFlags"/> is given. Sockets only replace dead connections:
/// each one takes the first dead slot, and a socket with no dead slot left is ignored by the kernel (no error).
/// </summary>
public sealed record NbdNetlinkReconfigureRequest
{
    public required int Index { get; init; }

    public IReadOnlyList<Socket>? Sockets { get; init; }

    public TimeSpan? Timeout { get; init; }

    public TimeSpan? DeadConnectionTimeout { get; init; }

    public ulong? ClientFlags { get; init; }

    /// <summary>Must repeat the identifier given at connect when there was one: the kernel refuses the request otherwise.</summary>
    public string? BackendIdentifier { get; init; }
}

/// <summary>One entry of NBD_CMD_STATUS: <paramref name="Connected"/> is true while the device has a configuration.</summary>
public sealed record NbdNetlinkDeviceStatus(int Index, bool Connected);

/// <summary>Client flag values for <see cref="NbdNetlinkConnectRequest.ClientFlags"/> (linux/nbd.h NBD_CFLAG_*).</summary>
public static class NbdClientFlags
{
    /// <summary>Remove the device (it disappears from /dev and sysfs) once it is disconnected.</summary>
    public const ulong DestroyOnDisconnect = Interop.NbdConstants.NBD_CFLAG_DESTROY_ON_DISCONNECT;

    /// <summary>Disconnect when the last opener of the block device closes it.</summary>
    public const ulong DisconnectOnClose = Interop.NbdConstants.NBD_CFLAG_DISCONNECT_ON_CLOSE;
}

using System.Net.Sockets;
using NbdDaemon.Configuration;

namespace NbdDaemon.Mappings;

/// <summary>
/// Opens one connection to a mapping's export and completes the handshake (Connecting state).
/// Integration seam over <c>Nbd.Protocol.NbdClient.ConnectAsync(NbdUri, NbdClientOptions?, CancellationToken)</c>:
/// the adapter maps <c>NbdExportInfo</c> to <see cref="ExportDescription"/> and wraps protocol errors that can
/// never succeed on retry (e.g. <c>NbdTlsRequiredException</c>) into <see cref="MappingException"/> with
/// <see cref="FailureKind.Permanent"/>; every other exception is treated as transient.
/// </summary>
internal interface INbdConnector
{
    Task<INbdSession> ConnectAsync(MappingOptions mapping, CancellationToken cancellationToken);
}

/// <summary>A negotiated connection in transmission phase; disposing it closes the socket.</summary>
internal interface INbdSession : IDisposable
{
    ExportDescription Export { get; }

    /// <summary>The socket to hand to the kernel. Stays owned by the session: dispose the session after the kernel let go.</summary>
    Socket Socket { get; }

    /// <summary>
    /// shutdown(SHUT_RDWR): ends the connection for whoever holds the socket, the kernel included (disposing only
    /// closes our descriptor; the kernel's reference keeps the connection alive). Never throws.
    /// </summary>
    void Shutdown();

    /// <summary>
    /// The device the kernel serves through this session, once known (a netlink mapping without <c>Device</c> learns it
    /// from CONNECT or adoption): for sessions that log on their own, such as the relay's.
    /// </summary>
    void Serves(string device)
    {
    }

    /// <summary>
    /// True for a session that carries on a connection the kernel has used since an earlier process (a relay handed
    /// over through systemd's file descriptor store): its socket is never offered to the kernel, the device is only
    /// adopted with it.
    /// </summary>
    bool Resumed => false;

    /// <summary>Whether <see cref="HandOver"/> can keep the kernel's connection alive (asked before the stop prepares for it).</summary>
    bool CanHandOver => false;

    /// <summary>
    /// The daemon stops and leaves the device configured (OnStop=Leave): keep the kernel's connection alive for the
    /// next process if this session can (<paramref name="slot"/>: its place among the mapping's connections). Called
    /// before Dispose; logs what it did and never throws.
    /// </summary>
    void HandOver(int slot)
    {
    }
}

/// <summary>What the server said about the export (from NbdExportInfo).</summary>
/// <param name="Name">Export name.</param>
/// <param name="Size">Size in bytes.</param>
/// <param name="TransmissionFlags">NBD_FLAG_* transmission flags as sent (proto.md "Transmission flags").</param>
/// <param name="MinimumBlockSize">NBD_INFO_BLOCK_SIZE minimum, if the server sent block size constraints.</param>
/// <param name="PreferredBlockSize">NBD_INFO_BLOCK_SIZE preferred, if sent.</param>
/// <param name="MaximumPayload">NBD_INFO_BLOCK_SIZE maximum payload, if sent: no request may carry more.</param>
internal sealed record ExportDescription(string Name, ulong Size, ushort TransmissionFlags, uint? MinimumBlockSize = null, uint? PreferredBlockSize = null, uint? MaximumPayload = null)
{
    /// <summary>NBD_FLAG_HAS_FLAGS, bit 0.</summary>
    public const ushort FlagHasFlags = 1;

    /// <summary>NBD_FLAG_READ_ONLY, bit 1.</summary>
    public const ushort FlagReadOnly = 2;

    /// <summary>NBD_FLAG_CAN_MULTI_CONN, bit 8.</summary>
    public const ushort FlagCanMultiConn = 1 << 8;

    public bool ReadOnly => (TransmissionFlags & FlagReadOnly) != 0;
}

using System.Net.Sockets;
using Nbd.Protocol;
using NbdDaemon.Configuration;

namespace NbdDaemon.Mappings.Linux;

/// <summary>
/// <see cref="INbdConnector"/> over <see cref="NbdClient"/>: one connect + handshake bounded by the mapping's
/// <c>Timeout</c>. Protocol failures become <see cref="MappingException"/>s whose kind the reconnect policy reads:
/// only what a retry can never fix (TLS) is permanent; a refused or unknown export may come back after a server restart.
/// </summary>
internal sealed class ProtocolConnector(TimeProvider time) : INbdConnector
{
    public async Task<INbdSession> ConnectAsync(MappingOptions mapping, CancellationToken cancellationToken)
    {
        var uri = NbdUri.Parse(mapping.Uri);
        var options = new NbdClientOptions { ConnectTimeout = mapping.Timeout, HandshakeTimeout = mapping.Timeout, TimeProvider = time };
        try
        {
            NbdConnection connection = await NbdClient.ConnectAsync(uri, options, cancellationToken);
            try
            {
                TcpKeepAlive.Apply(connection.Socket, mapping.KeepAlive);
            }
            catch (SocketException e)
            {
                connection.Dispose();
                throw new MappingException($"could not turn on TCP keepalive: {e.Message}", FailureKind.Transient, e);
            }

            return new Session(connection);
        }
        catch (NbdException e)
        {
            throw new MappingException(Reason(e), KindOf(e), e);
        }
    }

    internal static FailureKind KindOf(NbdException e) =>
        e is NbdTlsRequiredException or NbdTlsNotSupportedException ? FailureKind.Permanent : FailureKind.Transient;

    /// <summary>The few words for STATUS= and the journal (<see cref="FailureText.Describe(Exception)"/>); the full exception travels as the inner exception.</summary>
    internal static string Reason(NbdException e) => FailureText.Describe(e);

    private sealed class Session(NbdConnection connection) : INbdSession
    {
        public ExportDescription Export { get; } = new(
            connection.Export.Name,
            connection.Export.Size,
            (ushort)connection.Export.Flags,
            connection.Export.BlockSizes?.Minimum,
            connection.Export.BlockSizes?.Preferred,
            connection.Export.BlockSizes?.Maximum);

        public Socket Socket => connection.Socket;

        public void Shutdown()
        {
            try
            {
                connection.Socket.Shutdown(SocketShutdown.Both);
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                // Already shut down by the peer or the kernel (ENOTCONN): the goal is reached either way.
            }
        }

        public void Dispose() => connection.Dispose();
    }
}

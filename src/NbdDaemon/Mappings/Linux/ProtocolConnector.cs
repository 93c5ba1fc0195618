using System.Globalization;
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

    /// <summary>The few words for STATUS= and the journal; the full exception travels as the inner exception.</summary>
    internal static string Reason(NbdException e) => e switch
    {
        // proto.md: a server not in TLS mode MAY answer NBD_REP_ERR_TLS_REQD for an export it does not have, so that
        // its exports cannot be probed; and this version cannot run TLS (nbds:// is refused), so no URI would help.
        NbdTlsRequiredException { Option: NbdOption.List } => "server requires TLS, which this version does not support",
        NbdTlsRequiredException => "server requires TLS, which this version does not support (or has no such export: a server may answer so for one it does not have)",
        NbdTlsNotSupportedException t => Clause(t.Detail),
        // A unix socket's failure in words that say where to look; a TCP one in the socket error's few words.
        NbdConnectException { Reason: string reason } => reason,
        NbdConnectException c => FailureText.Describe(c),
        NbdTimeoutException t => string.Create(CultureInfo.InvariantCulture, $"{(t.Phase == NbdTimeoutPhase.Connect ? "connect" : "handshake")} timed out after {t.Timeout.TotalSeconds:0.###} s"),
        NbdServerErrorException s => $"server refused: {s.ReplyTypeName}{Meaning(s.ReplyType)}{(string.IsNullOrEmpty(s.ServerMessage) ? "" : " (" + NbdText.Printable(s.ServerMessage) + ")")}",
        // What the server cannot do (select an export), or a connection that ended mid-message: the words say it all.
        NbdProtocolException { Error: NbdProtocolError.Unsupported or NbdProtocolError.Truncated } p => Clause(p.Detail),
        // The detail (which field, which value) is what an admin needs in STATUS=; the error's kind alone said nothing.
        NbdProtocolException p => "protocol error: " + Clause(p.Detail),
        _ => Clause(e.Detail),
    };

    /// <summary>A message as a clause inside a status line: no final period, a leading "Server" or "Connection" in lower case.</summary>
    internal static string Clause(string message)
    {
        string text = NbdText.Printable(message.TrimEnd().TrimEnd('.'));
        return text.Length > 1 && char.IsUpper(text[0]) && char.IsLower(text[1]) ? char.ToLowerInvariant(text[0]) + text[1..] : text;
    }

    /// <summary>What proto.md says a refusal means, where the reply's name alone would leave an admin guessing.</summary>
    private static string Meaning(NbdReplyType reply) => reply switch
    {
        NbdReplyType.ErrUnknown => ", no such export",
        NbdReplyType.ErrPolicy => ", forbidden by the server's policy",
        NbdReplyType.ErrShutdown => ", the server is shutting down",
        NbdReplyType.ErrBlockSizeReqd => ", the server requires block size negotiation",
        _ => string.Empty,
    };

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

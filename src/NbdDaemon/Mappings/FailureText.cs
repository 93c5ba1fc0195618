using System.Globalization;
using System.Net.Sockets;
using Nbd.Protocol;

namespace NbdDaemon.Mappings;

/// <summary>
/// Turns a failure into the few words shown in STATUS= and the journal ("connection refused", "server refused:
/// NBD_REP_ERR_UNKNOWN, no such export"), by type: for a mapping's attempts, the relay's reconnects and the verbs alike.
/// </summary>
internal static class FailureText
{
    public static string Describe(Exception exception)
    {
        for (Exception? e = exception; e is not null; e = e.InnerException)
        {
            switch (e)
            {
                case MappingException m:
                    return m.Reason;
                case NbdConnectException { Reason: string reason }:
                    return reason; // a unix socket's failure in words that say where to look
                case NbdConnectException:
                    break; // its SocketException, next, says it in a few words
                case NbdException n:
                    return Words(n);
                case SocketException s:
                    return Describe(s.SocketErrorCode) ?? s.Message;
                case TimeoutException:
                    return "timed out";
                default:
                    break;
            }
        }

        return exception.Message;
    }

    private static string Words(NbdException e) => e switch
    {
        // proto.md: a server not in TLS mode MAY answer NBD_REP_ERR_TLS_REQD for an export it does not have, so that
        // its exports cannot be probed; and this version cannot run TLS (nbds:// is refused), so no URI would help.
        NbdTlsRequiredException { Option: NbdOption.List } => "server requires TLS, which this version does not support",
        NbdTlsRequiredException => "server requires TLS, which this version does not support (or has no such export: a server may answer so for one it does not have)",
        NbdTimeoutException t => Timeout(t),
        NbdServerErrorException s => $"server refused: {s.ReplyTypeName}{Meaning(s.ReplyType)}{(string.IsNullOrEmpty(s.ServerMessage) ? "" : " (" + NbdText.Printable(s.ServerMessage) + ")")}",
        // What the server cannot do (select an export), or a connection that ended mid-message: the words say it all.
        NbdProtocolException { Error: NbdProtocolError.Unsupported or NbdProtocolError.Truncated } p => Clause(p.Detail),
        // The detail (which field, which value) is what an admin needs in STATUS=; the error's kind alone said nothing.
        NbdProtocolException p => "protocol error: " + Clause(p.Detail),
        _ => Clause(e.Detail), // NbdTlsNotSupportedException among them: its text says what can be used instead
    };

    /// <summary>
    /// A connect that took too long, or a handshake: then what it waited for, since a server that accepted and never
    /// sent its greeting (a port that is no NBD server's, or a hung server) needs another look than one that stalled later.
    /// </summary>
    private static string Timeout(NbdTimeoutException t)
    {
        FormattableString text = t switch
        {
            { Phase: NbdTimeoutPhase.Connect } => $"connect timed out after {t.Timeout.TotalSeconds:0.###} s",
            { NoGreeting: true } => $"handshake timed out after {t.Timeout.TotalSeconds:0.###} s: {NoGreeting}",
            { Awaiting: string what } => $"handshake timed out after {t.Timeout.TotalSeconds:0.###} s waiting for {what}",
            _ => $"handshake timed out after {t.Timeout.TotalSeconds:0.###} s",
        };
        return text.ToString(CultureInfo.InvariantCulture);
    }

    /// <summary>A connection accepted, and not one byte of the greeting: said alike for the client's timeout and an attempt's deadline.</summary>
    public const string NoGreeting = "the connection was accepted, but no NBD greeting came (is an NBD server listening there, and is it stuck?)";

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

    /// <summary>
    /// The first <paramref name="length"/> UTF-16 units of <paramref name="text"/> (all of it when shorter), one fewer
    /// when the cut would split a surrogate pair: half a pair is encoded as U+FFFD, a character the server never sent.
    /// </summary>
    public static string Prefix(string text, int length)
    {
        if (text.Length <= length)
        {
            return text;
        }

        return length > 0 && char.IsHighSurrogate(text[length - 1]) ? text[..(length - 1)] : text[..length];
    }

    public static FailureKind KindOf(Exception exception) => exception is MappingException m ? m.Kind : FailureKind.Transient;

    private static string? Describe(SocketError error) => error switch
    {
        SocketError.ConnectionRefused => "connection refused",
        SocketError.TimedOut => "connection timed out",
        SocketError.HostNotFound or SocketError.NoData or SocketError.TryAgain => "host not found",
        SocketError.HostUnreachable => "host unreachable",
        SocketError.NetworkUnreachable => "network unreachable",
        SocketError.ConnectionReset => "connection reset",
        SocketError.AddressNotAvailable => "address not available",
        _ => null,
    };
}

using System.Net.Sockets;

namespace NbdDaemon.Mappings;

/// <summary>Turns a failure into the few words shown in STATUS= ("connection refused"), by type.</summary>
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
                case Nbd.Protocol.NbdConnectException { Reason: not null, SocketError: SocketError.AddressNotAvailable }:
                    return "no such socket file"; // a unix socket path; .NET's word for ENOENT would say "address not available"
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

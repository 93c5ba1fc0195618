using System.Diagnostics.CodeAnalysis;
using System.Globalization;
using System.Net;
using System.Text;

namespace Nbd.Protocol;

/// <summary>
/// An NBD URI as described by doc/uri.md of NetworkBlockDevice/nbd:
/// <c>nbd://host[:port]/[export]</c>, <c>nbds://…</c>, <c>nbd+unix:///[export]?socket=PATH</c>, <c>nbds+unix://…</c>.
/// </summary>
/// <remarks>
/// Choices uri.md leaves to the client: a TCP URI without a host and a unix URI with a host or port are rejected;
/// query parameters other than <c>socket</c>, the <c>tls-*</c> ones and experimental <c>x-*</c> ones are rejected
/// (uri.md: "SHOULD be diagnosed"); fragments are rejected. Userinfo is accepted and kept in <see cref="User"/>
/// (meaningful only for TLS). <c>tls-*</c> parameters are validated but not interpreted yet.
/// </remarks>
public sealed record NbdUri
{
    /// <summary>A DNS name's limit (RFC 1035: 255 octets on the wire, 253 characters written).</summary>
    public const int MaxHostLength = 253;

    /// <summary>sun_path holds 108 bytes with the terminating NUL (unix(7)).</summary>
    public const int MaxSocketPathBytes = 107;

    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>Lower-case scheme: nbd, nbds, nbd+unix or nbds+unix.</summary>
    public required string Scheme { get; init; }

    /// <summary>True for nbds and nbds+unix: the connection MUST be TLS-encrypted or fail.</summary>
    public bool Tls { get; init; }

    /// <summary>Host name or IP literal (IPv6 without brackets) for TCP; null for unix sockets.</summary>
    public string? Host { get; init; }

    /// <summary>TCP port (default 10809); 0 for unix sockets.</summary>
    public int Port { get; init; }

    /// <summary>Unix socket path (may start with NUL for the abstract namespace); null for TCP.</summary>
    public string? SocketPath { get; init; }

    /// <summary>Percent-decoded export name: the path without its leading '/'. Empty means the default export.</summary>
    public string ExportName { get; init; } = "";

    /// <summary>Percent-decoded userinfo, if the authority had one.</summary>
    public string? User { get; init; }

    /// <summary>True for nbd+unix and nbds+unix.</summary>
    public bool IsUnix => SocketPath is not null;

    /// <summary>Where to connect, for messages: "host:port" or the socket path.</summary>
    public string EndPointDescription =>
        IsUnix ? $"unix:{SocketPath!.Replace("\0", "@", StringComparison.Ordinal)}" : $"{FormatHost(Host!)}:{Port.ToString(CultureInfo.InvariantCulture)}";

    /// <summary>Parses <paramref name="text"/>; throws <see cref="NbdUriException"/> naming why it is invalid.</summary>
    public static NbdUri Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        return TryParse(text, out var uri, out var error) ? uri : throw new NbdUriException(text, error);
    }

    public static bool TryParse(string text, [NotNullWhen(true)] out NbdUri? uri, [NotNullWhen(false)] out string? error)
    {
        uri = null;
        if (text is null)
        {
            error = "the URI is null";
            return false;
        }

        error = ParseCore(text, out uri);
        return error is null;
    }

    // Returns the reason the text is invalid, or null with uri set.
    private static string? ParseCore(string text, out NbdUri? uri)
    {
        uri = null;
        foreach (char c in text)
        {
            if (c <= ' ' || c == 0x7f)
            {
                return "it contains a space or control character (percent-encode it)";
            }

            if (c > 0x7e)
            {
                return $"character '{c}' must be percent-encoded";
            }
        }

        int schemeEnd = text.IndexOf("://", StringComparison.Ordinal);
        if (schemeEnd <= 0)
        {
            return "expected '<scheme>://' (nbd, nbds, nbd+unix or nbds+unix)";
        }

        string scheme = text[..schemeEnd].ToLowerInvariant();
        bool unix, tls;
        switch (scheme)
        {
            case "nbd": unix = false; tls = false; break;
            case "nbds": unix = false; tls = true; break;
            case "nbd+unix": unix = true; tls = false; break;
            case "nbds+unix": unix = true; tls = true; break;
            default:
                return $"unsupported scheme '{scheme}' (expected nbd, nbds, nbd+unix or nbds+unix)";
        }

        string rest = text[(schemeEnd + 3)..];
        if (rest.Contains('#', StringComparison.Ordinal))
        {
            return "a fragment ('#...') has no meaning in an NBD URI";
        }

        string? query = null;
        int q = rest.IndexOf('?', StringComparison.Ordinal);
        if (q >= 0)
        {
            query = rest[(q + 1)..];
            rest = rest[..q];
        }

        int slash = rest.IndexOf('/', StringComparison.Ordinal);
        string authority = slash >= 0 ? rest[..slash] : rest;
        string path = slash >= 0 ? rest[slash..] : "";

        string? user = null;
        int at = authority.LastIndexOf('@');
        if (at >= 0)
        {
            if (!TryDecode(authority[..at], out user))
            {
                return "the userinfo has a bad percent-encoding";
            }

            authority = authority[(at + 1)..];
        }

        string? host = null;
        int port = 0;
        string? portText = null;
        if (authority.Length > 0)
        {
            if (authority[0] == '[')
            {
                int close = authority.IndexOf(']', StringComparison.Ordinal);
                if (close < 0)
                {
                    return "IPv6 literal is missing its closing ']'";
                }

                if (!TryDecode(authority[1..close], out string? literal) || !IPAddress.TryParse(literal, out var ip) ||
                    ip.AddressFamily != System.Net.Sockets.AddressFamily.InterNetworkV6)
                {
                    return $"'{authority[..(close + 1)]}' is not a valid IPv6 literal";
                }

                host = literal;
                string after = authority[(close + 1)..];
                if (after.Length > 0)
                {
                    if (after[0] != ':')
                    {
                        return "unexpected characters after the IPv6 literal";
                    }

                    portText = after[1..];
                }
            }
            else
            {
                int colon = authority.IndexOf(':', StringComparison.Ordinal);
                string hostText = colon >= 0 ? authority[..colon] : authority;
                if (colon >= 0)
                {
                    portText = authority[(colon + 1)..];
                }

                if (hostText.Length > 0)
                {
                    if (!TryDecode(hostText, out host) || host.Length == 0 || host.Any(ch => ch <= ' ' || "/?#[]@".Contains(ch, StringComparison.Ordinal)))
                    {
                        return $"'{hostText}' is not a valid host name";
                    }

                    if (host.Length > MaxHostLength)
                    {
                        return $"the host name is longer than {MaxHostLength} characters (the limit of a DNS name)";
                    }
                }
            }
        }

        // RFC 3986 3.2.3: "port = *DIGIT"; an empty port ("host:") is the scheme's default.
        if (portText is { Length: > 0 })
        {
            if (portText.Length > 5 || !portText.All(char.IsAsciiDigit) ||
                !int.TryParse(portText, NumberStyles.None, CultureInfo.InvariantCulture, out port) || port is < 1 or > 65535)
            {
                return $"port '{portText}' is not a number from 1 to 65535";
            }
        }

        if (unix)
        {
            if (host is not null || portText is not null)
            {
                return $"a {scheme} URI must not name a host or port (use {scheme}:///export?socket=PATH)";
            }
        }
        else
        {
            if (host is null)
            {
                return "a TCP URI needs a host (nbd://host[:port]/export)";
            }

            if (string.IsNullOrEmpty(portText))
            {
                port = NbdProtocol.DefaultPort;
            }
        }

        // uri.md "NBD URI export name": the path except its leading '/' is the export name, percent-decoded.
        string exportName = "";
        if (path.Length > 0)
        {
            if (!TryDecode(path[1..], out string? decoded))
            {
                return "the export name has a bad percent-encoding or is not UTF-8";
            }

            exportName = decoded;
        }

        if (exportName.Contains('\0', StringComparison.Ordinal))
        {
            return "the export name must not contain NUL";
        }

        if (Encoding.UTF8.GetByteCount(exportName) > NbdProtocol.MaxStringLength)
        {
            return $"the export name is longer than {NbdProtocol.MaxStringLength} bytes";
        }

        string? socket = null;
        var seen = new HashSet<string>(StringComparer.Ordinal);
        if (!string.IsNullOrEmpty(query))
        {
            foreach (string pair in query.Split('&'))
            {
                if (pair.Length == 0)
                {
                    continue;
                }

                int eq = pair.IndexOf('=', StringComparison.Ordinal);
                if (!TryDecode(eq >= 0 ? pair[..eq] : pair, out string? key) || !TryDecode(eq >= 0 ? pair[(eq + 1)..] : "", out string? value))
                {
                    return $"query parameter '{pair}' has a bad percent-encoding";
                }

                if (!seen.Add(key))
                {
                    return $"query parameter '{key}' is given twice";
                }

                switch (key)
                {
                    case "socket":
                        if (!unix)
                        {
                            return $"'socket' is only valid with nbd+unix or nbds+unix, not {scheme}";
                        }

                        socket = value;
                        break;
                    case "tls-type":
                        if (value is not ("anon" or "x509" or "psk"))
                        {
                            return $"tls-type '{value}' is not one of anon, x509, psk";
                        }

                        break;
                    case "tls-verify-peer":
                        if (value is not ("0" or "1"))
                        {
                            return $"tls-verify-peer '{value}' is not 0 or 1";
                        }

                        break;
                    case "tls-hostname":
                        break;
                    default:
                        if (!key.StartsWith("x-", StringComparison.Ordinal))
                        {
                            return $"unknown query parameter '{key}'";
                        }

                        break;
                }
            }
        }

        if (unix && string.IsNullOrEmpty(socket))
        {
            return $"a {scheme} URI needs ?socket=PATH";
        }

        if (socket is not null && Encoding.UTF8.GetByteCount(socket) > MaxSocketPathBytes)
        {
            return $"the socket path is longer than {MaxSocketPathBytes} bytes (the limit of a unix socket address)";
        }

        uri = new NbdUri
        {
            Scheme = scheme,
            Tls = tls,
            Host = host,
            Port = unix ? 0 : port,
            SocketPath = socket,
            ExportName = exportName,
            User = user,
        };
        return null;
    }

    private static bool TryDecode(string text, [NotNullWhen(true)] out string? decoded)
    {
        decoded = null;
        if (!text.Contains('%', StringComparison.Ordinal))
        {
            decoded = text;
            return true;
        }

        var bytes = new List<byte>(text.Length);
        for (int i = 0; i < text.Length; i++)
        {
            char c = text[i];
            if (c == '%')
            {
                if (i + 2 >= text.Length)
                {
                    return false;
                }

                if (!byte.TryParse(text.AsSpan(i + 1, 2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out byte b))
                {
                    return false;
                }

                bytes.Add(b);
                i += 2;
            }
            else
            {
                bytes.Add((byte)c);
            }
        }

        try
        {
            decoded = StrictUtf8.GetString(bytes.ToArray());
            return true;
        }
        catch (DecoderFallbackException)
        {
            return false;
        }
    }

    private static string FormatHost(string host) => host.Contains(':', StringComparison.Ordinal) ? $"[{host}]" : host;

    // Keeps RFC 3986 unreserved characters and the sub-delims that are safe in a path or query value.
    private static string Encode(string text, string alsoKeep)
    {
        var sb = new StringBuilder(text.Length);
        foreach (byte b in Encoding.UTF8.GetBytes(text))
        {
            char c = (char)b;
            bool keep = char.IsAsciiLetterOrDigit(c) || c is '-' or '.' or '_' or '~' or '!' or '$' or '\'' or '(' or ')' or '*' or ',' or ';' or ':' or '@' ||
                alsoKeep.Contains(c, StringComparison.Ordinal);
            if (keep)
            {
                sb.Append(c);
            }
            else
            {
                sb.Append('%').Append(b.ToString("X2", CultureInfo.InvariantCulture));
            }
        }

        return sb.ToString();
    }

    /// <summary>The canonical URI text; parsing it again yields an equal value.</summary>
    public override string ToString()
    {
        var sb = new StringBuilder();
        sb.Append(Scheme).Append("://");
        if (User is not null)
        {
            sb.Append(Encode(User, "")).Append('@');
        }

        if (!IsUnix && Host is not null)
        {
            sb.Append(Host.Contains(':', StringComparison.Ordinal) ? $"[{Host.Replace("%", "%25", StringComparison.Ordinal)}]" : Encode(Host, ""));
            if (Port != NbdProtocol.DefaultPort)
            {
                sb.Append(':').Append(Port.ToString(CultureInfo.InvariantCulture));
            }
        }

        sb.Append('/').Append(Encode(ExportName, "/=&+"));
        if (SocketPath is not null)
        {
            sb.Append("?socket=").Append(Encode(SocketPath, "/"));
        }

        return sb.ToString();
    }
}

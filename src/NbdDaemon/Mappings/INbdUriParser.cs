using NbdDaemon.Configuration;

namespace NbdDaemon.Mappings;

/// <summary>
/// Checks an NBD URI at configuration time and names its server and export for logs.
/// Integration seam: the adapter over <c>Nbd.Protocol.NbdUri.Parse</c> throws its <c>NbdUriException</c>
/// (a <see cref="FormatException"/>), whose message becomes the configuration error's reason.
/// </summary>
internal interface INbdUriParser
{
    /// <exception cref="FormatException">The URI is not a usable NBD URI; the message says why.</exception>
    MappingEndpoint Parse(string uri);
}

/// <summary>
/// A strict reader of the NBD URI forms (doc/uri.md of NetworkBlockDevice/nbd) used until the protocol
/// library's parser is wired in: nbd://host[:port][/export], nbds://…, nbd+unix:///export?socket=PATH.
/// </summary>
internal sealed class BasicNbdUriParser : INbdUriParser
{
    private const int DefaultPort = 10809;

    public MappingEndpoint Parse(string uri)
    {
        ArgumentNullException.ThrowIfNull(uri);
        int schemeEnd = uri.IndexOf("://", StringComparison.Ordinal);
        if (schemeEnd <= 0)
        {
            throw new FormatException("not a URI: expected nbd://, nbds://, nbd+unix:// or nbds+unix://");
        }

        string scheme = uri[..schemeEnd].ToLowerInvariant();
        string rest = uri[(schemeEnd + 3)..];
        int queryStart = rest.IndexOf('?', StringComparison.Ordinal);
        string query = queryStart >= 0 ? rest[(queryStart + 1)..] : string.Empty;
        string beforeQuery = queryStart >= 0 ? rest[..queryStart] : rest;
        int pathStart = beforeQuery.IndexOf('/', StringComparison.Ordinal);
        string authority = pathStart >= 0 ? beforeQuery[..pathStart] : beforeQuery;
        // doc/uri.md: the export name is the path without its leading '/', percent-decoded.
        string export = pathStart >= 0 ? System.Uri.UnescapeDataString(beforeQuery[(pathStart + 1)..]) : string.Empty;

        switch (scheme)
        {
            case "nbd":
            case "nbds":
                return new MappingEndpoint(ParseAuthority(authority), export);
            case "nbd+unix":
            case "nbds+unix":
                if (authority.Length != 0)
                {
                    throw new FormatException($"{scheme}:// must not name a host (got '{authority}')");
                }

                string? socket = null;
                foreach (string pair in query.Split('&', StringSplitOptions.RemoveEmptyEntries))
                {
                    if (pair.StartsWith("socket=", StringComparison.Ordinal))
                    {
                        socket = System.Uri.UnescapeDataString(pair["socket=".Length..]);
                    }
                }

                if (string.IsNullOrEmpty(socket))
                {
                    throw new FormatException($"{scheme}:// requires the query parameter socket=PATH");
                }

                return new MappingEndpoint(socket, export);
            default:
                throw new FormatException($"unsupported scheme '{scheme}' (expected nbd, nbds, nbd+unix or nbds+unix)");
        }
    }

    private static string ParseAuthority(string authority)
    {
        if (authority.Length == 0)
        {
            throw new FormatException("missing host");
        }

        string host = authority;
        string? portText = null;
        if (authority[0] == '[')
        {
            int close = authority.IndexOf(']', StringComparison.Ordinal);
            if (close < 0)
            {
                throw new FormatException("unterminated IPv6 literal");
            }

            host = authority[..(close + 1)];
            if (close + 1 < authority.Length)
            {
                if (authority[close + 1] != ':')
                {
                    throw new FormatException("unexpected text after IPv6 literal");
                }

                portText = authority[(close + 2)..];
            }
        }
        else
        {
            int colon = authority.LastIndexOf(':');
            if (colon >= 0)
            {
                host = authority[..colon];
                portText = authority[(colon + 1)..];
            }
        }

        if (host.Length == 0)
        {
            throw new FormatException("missing host");
        }

        int port = DefaultPort;
        if (portText is not null
            && (!int.TryParse(portText, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out port)
                || port is < 1 or > 65535))
        {
            throw new FormatException($"invalid port '{portText}' (1..65535)");
        }

        return $"{host}:{port}";
    }
}

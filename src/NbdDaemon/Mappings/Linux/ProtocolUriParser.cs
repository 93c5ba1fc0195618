using Nbd.Protocol;
using NbdDaemon.Configuration;

namespace NbdDaemon.Mappings.Linux;

/// <summary><see cref="INbdUriParser"/> over <see cref="NbdUri.Parse"/>: the same rules the connector will apply.</summary>
internal sealed class ProtocolUriParser : INbdUriParser
{
    public MappingEndpoint Parse(string uri)
    {
        var parsed = NbdUri.Parse(uri);
        return parsed.Tls
            ? throw new NotSupportedException("it asks for TLS (nbds), which this version does not implement, so the mapping could never connect; only a server that also allows plaintext can be mapped, with nbd://")
            : new MappingEndpoint(parsed.EndPointDescription, parsed.ExportName);
    }
}

using Nbd.Protocol;
using NbdDaemon.Configuration;

namespace NbdDaemon.Mappings.Linux;

/// <summary><see cref="INbdUriParser"/> over <see cref="NbdUri.Parse"/>: the same rules the connector will apply.</summary>
internal sealed class ProtocolUriParser : INbdUriParser
{
    public MappingEndpoint Parse(string uri)
    {
        var parsed = NbdUri.Parse(uri);
        return new MappingEndpoint(parsed.EndPointDescription, parsed.ExportName);
    }
}

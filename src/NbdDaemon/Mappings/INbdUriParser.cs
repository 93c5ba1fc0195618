using NbdDaemon.Configuration;

namespace NbdDaemon.Mappings;

/// <summary>
/// Checks an NBD URI at configuration time and names its server and export for logs.
/// Integration seam: the adapter over <c>Nbd.Protocol.NbdUri.Parse</c> throws its <c>NbdUriException</c>
/// (a <see cref="FormatException"/>), whose message becomes the configuration error's reason.
/// </summary>
internal interface INbdUriParser
{
    /// <exception cref="FormatException">The URI is not a valid NBD URI; the message says why.</exception>
    /// <exception cref="NotSupportedException">A valid URI this version cannot connect to (TLS); the message says why.</exception>
    MappingEndpoint Parse(string uri);
}

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

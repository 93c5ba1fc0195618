using Nbd.Protocol;

namespace Nbd.Fuzz;

/// <summary>Runs one handshake over <paramref name="stream"/>; the engine classifies the task it returns.</summary>
internal delegate Task HandshakeTarget(FuzzOperation operation, Stream stream, NbdUri uri, NbdClientOptions options);

/// <summary>
/// The real client: <c>NbdClient.NegotiateAsync</c> / <c>NegotiateListAsync</c> / <c>NegotiateInfoAsync</c>, the
/// handshake-over-a-stream entry points that <c>NbdClient.ConnectAsync</c> (what the daemon's reconnect calls),
/// <c>ListExportsAsync</c> and <c>GetInfoAsync</c> run once their socket is connected (internal to Nbd.Protocol,
/// visible to this project through InternalsVisibleTo).
/// </summary>
internal static class NbdClientTarget
{
    public static HandshakeTarget Instance { get; } = Run;

    private static Task Run(FuzzOperation operation, Stream stream, NbdUri uri, NbdClientOptions options) => operation switch
    {
        FuzzOperation.Go => NbdClient.NegotiateAsync(stream, uri, options, CancellationToken.None),
        FuzzOperation.List => NbdClient.NegotiateListAsync(stream, uri, options, CancellationToken.None),
        _ => NbdClient.NegotiateInfoAsync(stream, uri, options, CancellationToken.None),
    };
}

using System.Reflection;
using Nbd.Protocol;

namespace Nbd.Fuzz;

/// <summary>Runs one handshake over <paramref name="stream"/>; the engine classifies the task it returns.</summary>
internal delegate Task HandshakeTarget(FuzzOperation operation, Stream stream, NbdUri uri, NbdClientOptions options);

/// <summary>
/// The real client: <c>NbdClient.NegotiateAsync</c> / <c>NegotiateListAsync</c> / <c>NegotiateInfoAsync</c>, the
/// handshake-over-a-stream entry points that <c>NbdClient.ConnectAsync</c> (what the daemon's reconnect calls),
/// <c>ListExportsAsync</c> and <c>GetInfoAsync</c> run once their socket is connected. They are internal to
/// Nbd.Protocol (visible to its own tests only), so they are bound here once, by name and exact signature; a
/// rename fails the first call loudly rather than fuzzing nothing.
/// </summary>
internal static class NbdClientTarget
{
    private static readonly Func<Stream, NbdUri, NbdClientOptions, CancellationToken, Task<NbdExportInfo>> Go =
        Bind<Task<NbdExportInfo>>("NegotiateAsync");

    private static readonly Func<Stream, NbdUri, NbdClientOptions, CancellationToken, Task<IReadOnlyList<NbdExportListing>>> List =
        Bind<Task<IReadOnlyList<NbdExportListing>>>("NegotiateListAsync");

    private static readonly Func<Stream, NbdUri, NbdClientOptions, CancellationToken, Task<NbdExportInfo>> Info =
        Bind<Task<NbdExportInfo>>("NegotiateInfoAsync");

    public static HandshakeTarget Instance { get; } = Run;

    private static Task Run(FuzzOperation operation, Stream stream, NbdUri uri, NbdClientOptions options) => operation switch
    {
        FuzzOperation.Go => Go(stream, uri, options, CancellationToken.None),
        FuzzOperation.List => List(stream, uri, options, CancellationToken.None),
        _ => Info(stream, uri, options, CancellationToken.None),
    };

    private static Func<Stream, NbdUri, NbdClientOptions, CancellationToken, TResult> Bind<TResult>(string name)
    {
        var method = typeof(NbdClient).GetMethod(
            name, BindingFlags.NonPublic | BindingFlags.Static, [typeof(Stream), typeof(NbdUri), typeof(NbdClientOptions), typeof(CancellationToken)])
            ?? throw new MissingMethodException($"NbdClient.{name}(Stream, NbdUri, NbdClientOptions, CancellationToken) is gone; update tests/Nbd.Fuzz/HandshakeTarget.cs.");
        return method.CreateDelegate<Func<Stream, NbdUri, NbdClientOptions, CancellationToken, TResult>>();
    }
}

using System.Net;
using System.Net.Sockets;

namespace Nbd.Protocol.Tests.TestSupport;

/// <summary>
/// A real listening socket (loopback TCP or a unix socket in a temp dir) that accepts one client and runs a
/// script against it. The script reads what the client sent and answers, like a server would.
/// </summary>
internal sealed class FakeServer : IAsyncDisposable
{
    private readonly Socket _listener;
    private readonly string? _socketPath;
    private readonly Task _run;
    private readonly CancellationTokenSource _stop = new();

    private FakeServer(Socket listener, string? socketPath, Func<NetworkStream, CancellationToken, Task> script)
    {
        _listener = listener;
        _socketPath = socketPath;
        _run = RunAsync(script);
    }

    public NbdUri Uri(string export) => _socketPath is null
        ? NbdUri.Parse($"nbd://127.0.0.1:{((IPEndPoint)_listener.LocalEndPoint!).Port}/{export}")
        : NbdUri.Parse($"nbd+unix:///{export}?socket={_socketPath.Replace("\0", "%00", StringComparison.Ordinal)}");

    /// <summary>Completes when the script finished; faults if the script's assertions failed.</summary>
    public Task Completion => _run;

    public static FakeServer Tcp(Func<NetworkStream, CancellationToken, Task> script)
    {
        var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        return new FakeServer(listener, null, script);
    }

    public static FakeServer Unix(Func<NetworkStream, CancellationToken, Task> script, bool abstractNamespace = false)
    {
        string path = (abstractNamespace ? "\0" : "") + Path.Combine(Path.GetTempPath(), $"nbd-test-{Guid.NewGuid():N}.sock");
        var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        return new FakeServer(listener, path, script);
    }

    private async Task RunAsync(Func<NetworkStream, CancellationToken, Task> script)
    {
        using var client = await _listener.AcceptAsync(_stop.Token);
        await using var stream = new NetworkStream(client, ownsSocket: false);
        await script(stream, _stop.Token);
    }

    public static async Task<byte[]> ReadAsync(Stream stream, int count, CancellationToken ct)
    {
        var buffer = new byte[count];
        await stream.ReadExactlyAsync(buffer, ct);
        return buffer;
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        try
        {
            await _run.WaitAsync(TimeSpan.FromSeconds(5));
        }
        catch (Exception ex) when (ex is OperationCanceledException or IOException or SocketException or TimeoutException)
        {
        }

        _listener.Dispose();
        _stop.Dispose();
        if (_socketPath is not null && !_socketPath.StartsWith('\0'))
        {
            File.Delete(_socketPath);
        }
    }
}

using System.Net.Sockets;

namespace NbdDaemon.Tests;

/// <summary>A bound unix datagram socket standing in for systemd's notify socket or journald's socket.</summary>
internal sealed class DatagramListener : IDisposable
{
    private readonly Socket _socket = new(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);

    public DatagramListener(string path)
    {
        Path = path;
        _socket.Bind(new UnixDomainSocketEndPoint(path));
    }

    public string Path { get; }

    public async Task<byte[]> ReceiveAsync(TimeSpan? timeout = null)
    {
        var buffer = new byte[256 * 1024];
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(10));
        try
        {
            int n = await _socket.ReceiveAsync(buffer, SocketFlags.None, cts.Token);
            return buffer[..n];
        }
        catch (OperationCanceledException)
        {
            throw new TimeoutException($"no datagram on {Path} within {timeout ?? TimeSpan.FromSeconds(10)}");
        }
    }

    /// <summary>Blocking receive, for a reader that must not depend on the thread pool.</summary>
    public byte[] Receive(TimeSpan timeout)
    {
        var buffer = new byte[256 * 1024];
        if (!_socket.Poll(timeout, SelectMode.SelectRead))
        {
            throw new TimeoutException($"no datagram on {Path} within {timeout}");
        }

        return buffer[.._socket.Receive(buffer)];
    }

    public async Task<string> ReceiveTextAsync(TimeSpan? timeout = null) => System.Text.Encoding.UTF8.GetString(await ReceiveAsync(timeout));

    /// <summary>Asserts nothing else arrives within a short window.</summary>
    public async Task AssertSilentAsync(TimeSpan window)
    {
        try
        {
            byte[] extra = await ReceiveAsync(window);
            Assert.Fail("unexpected datagram: " + System.Text.Encoding.UTF8.GetString(extra));
        }
        catch (TimeoutException)
        {
        }
    }

    public void Dispose() => _socket.Dispose();
}

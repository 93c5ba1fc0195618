using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace Vm.Tests;

/// <summary>
/// tests/vm/tools/fault-proxy on the host (no VM), between a test client and an echo server on loopback:
/// bytes pass both ways, and each command does to the client's connection what the fault suite relies on.
/// </summary>
public sealed class FaultProxyTests : IAsyncLifetime
{
    private readonly string _dir = Directory.CreateTempSubdirectory("fault-proxy-test-").FullName;
    private readonly TcpListener _echo = new(IPAddress.Loopback, 0);
    private readonly CancellationTokenSource _stop = new();
    private Process? _proxy;
    private int _port;

    private string Fifo => Path.Combine(_dir, "ctl");

    public async Task InitializeAsync()
    {
        var tools = await VmTools.BuildAsync(new VmFixture().RepoRoot);
        _echo.Start();
        _ = EchoLoopAsync();
        var target = ((IPEndPoint)_echo.LocalEndpoint).Port;
        for (var attempt = 0; attempt < 5 && _proxy is null; attempt++)
        {
            _port = Random.Shared.Next(20000, 60000);
            var p = Process.Start(new ProcessStartInfo(Path.Combine(tools, "fault-proxy"))
            {
                ArgumentList = { _port.ToString(System.Globalization.CultureInfo.InvariantCulture), target.ToString(System.Globalization.CultureInfo.InvariantCulture), Fifo },
                RedirectStandardOutput = true,
                RedirectStandardError = true,
            })!;
            var first = await p.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(10));
            if (first?.EndsWith(" listening", StringComparison.Ordinal) == true)
            {
                _proxy = p;
            }
            else
            {
                p.Kill();
                await p.WaitForExitAsync();
                p.Dispose();
            }
        }

        Assert.NotNull(_proxy);
    }

    private async Task EchoLoopAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            TcpClient c;
            try
            {
                c = await _echo.AcceptTcpClientAsync(_stop.Token);
            }
            catch (OperationCanceledException)
            {
                return;
            }

            _ = Task.Run(async () =>
            {
                using (c)
                {
                    var s = c.GetStream();
                    var buf = new byte[4096];
                    try
                    {
                        int n;
                        while ((n = await s.ReadAsync(buf, _stop.Token)) > 0)
                        {
                            await s.WriteAsync(buf.AsMemory(0, n), _stop.Token);
                        }
                    }
                    catch (Exception e) when (e is IOException or OperationCanceledException)
                    {
                    }
                }
            });
        }
    }

    private async Task<(TcpClient Client, NetworkStream Stream)> ConnectAsync()
    {
        var c = new TcpClient();
        await c.ConnectAsync(IPAddress.Loopback, _port);
        var s = c.GetStream();
        Assert.Equal("hello", await EchoAsync(s, "hello", TimeSpan.FromSeconds(5)));
        return (c, s);
    }

    private static async Task<string?> EchoAsync(NetworkStream s, string text, TimeSpan wait)
    {
        var bytes = System.Text.Encoding.ASCII.GetBytes(text);
        await s.WriteAsync(bytes);
        var buf = new byte[bytes.Length];
        using var cts = new CancellationTokenSource(wait);
        try
        {
            await s.ReadExactlyAsync(buf, cts.Token);
        }
        catch (OperationCanceledException)
        {
            return null;
        }

        return System.Text.Encoding.ASCII.GetString(buf);
    }

    private Task CommandAsync(string line) => File.AppendAllTextAsync(Fifo, line + "\n");

    /// <summary>Reads the proxy's event lines until one ends with <paramref name="what"/>: the command took effect.</summary>
    private async Task ProxyEventAsync(string what)
    {
        using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        while (await _proxy!.StandardOutput.ReadLineAsync(deadline.Token) is string line)
        {
            if (line.EndsWith(" " + what, StringComparison.Ordinal))
            {
                return;
            }
        }

        Assert.Fail($"fault-proxy ended before '{what}'");
    }

    [Fact]
    public async Task Cut_OpenConnection_ClientSeesEndOfStreamAndNewConnectionsPass()
    {
        var (c, s) = await ConnectAsync();
        using (c)
        {
            await CommandAsync("cut");
            var n = await s.ReadAsync(new byte[16]).AsTask().WaitAsync(TimeSpan.FromSeconds(5));
            Assert.Equal(0, n);
        }

        using var again = (await ConnectAsync()).Client;
    }

    [Fact]
    public async Task Reset_OpenConnection_ClientSeesConnectionReset()
    {
        var (c, s) = await ConnectAsync();
        using (c)
        {
            await CommandAsync("reset");
            var e = await Assert.ThrowsAsync<IOException>(async () =>
                await s.ReadAsync(new byte[16]).AsTask().WaitAsync(TimeSpan.FromSeconds(5)));
            Assert.Equal(SocketError.ConnectionReset, Assert.IsType<SocketException>(e.InnerException).SocketErrorCode);
        }
    }

    [Fact]
    public async Task Stall_OpenConnection_NothingPassesUntilResumeThenEverything()
    {
        var (c, s) = await ConnectAsync();
        using (c)
        {
            await CommandAsync("stall 30");
            await ProxyEventAsync("stall s=30.000");
            Assert.Null(await EchoAsync(s, "abc", TimeSpan.FromMilliseconds(700)));
            await CommandAsync("resume");
            var buf = new byte[3];
            await s.ReadExactlyAsync(buf).AsTask().WaitAsync(TimeSpan.FromSeconds(5));
            Assert.Equal("abc", System.Text.Encoding.ASCII.GetString(buf));
            Assert.Equal("more", await EchoAsync(s, "more", TimeSpan.FromSeconds(5)));
        }
    }

    public async Task DisposeAsync()
    {
        await _stop.CancelAsync();
        _echo.Stop();
        if (_proxy is not null)
        {
            _proxy.Kill();
            await _proxy.WaitForExitAsync();
            _proxy.Dispose();
        }

        _stop.Dispose();
        Directory.Delete(_dir, recursive: true);
    }
}

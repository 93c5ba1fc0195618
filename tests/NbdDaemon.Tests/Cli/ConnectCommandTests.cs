using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using NbdDaemon.Cli;

namespace NbdDaemon.Tests.Cli;

/// <summary>
/// `nbd-daemon connect` up to the handshake, where it fails before any device is touched: a server that accepts and
/// then says nothing.
/// </summary>
public sealed class ConnectCommandTests
{
    [Fact]
    public async Task RunAsync_TimeoutOption_IsAlsoTheHandshakeDeadline()
    {
        using var silent = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        silent.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        silent.Listen(); // the kernel accepts for it; no greeting ever comes
        int port = ((IPEndPoint)silent.LocalEndPoint!).Port;
        var stdout = new StringWriter();
        var stderr = new StringWriter();

        var clock = Stopwatch.StartNew();
        int exit = await ConnectCommand.RunAsync(
            new ConnectCommand.ConnectRequest($"nbd://127.0.0.1:{port}/x", Device: null, Netlink: false, BlockSize: null, TimeoutSeconds: 1, ReadOnly: false),
            stdout,
            stderr,
            CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(8));

        // 1 s, not the client's default 10 s; the message names the phase and the deadline.
        Assert.Equal(1, exit);
        Assert.InRange(clock.Elapsed.TotalSeconds, 0.9, 5);
        Assert.Contains("Handshake timed out after 1000 ms", stderr.ToString(), StringComparison.Ordinal);
        Assert.Equal("", stdout.ToString());
    }
}

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
        Assert.Contains("/x: handshake timed out after 1 s: the connection was accepted, but no NBD greeting came (is an NBD server listening there, and is it stuck?)", stderr.ToString(), StringComparison.Ordinal);
        Assert.Equal("", stdout.ToString());
    }

    [Theory]
    [InlineData(1000u)]
    [InlineData(8192u)]
    [InlineData(256u)]
    public async Task RunAsync_BlockSizeTheKernelCannotTake_Exit2BeforeConnecting(uint blockSize)
    {
        // A server that would only time out: the refusal must come first, without waiting for it.
        using var silent = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        silent.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        silent.Listen();
        int port = ((IPEndPoint)silent.LocalEndPoint!).Port;
        var stderr = new StringWriter();

        var clock = Stopwatch.StartNew();
        int exit = await ConnectCommand.RunAsync(
            new ConnectCommand.ConnectRequest($"nbd://127.0.0.1:{port}/x", Device: null, Netlink: false, BlockSize: blockSize, TimeoutSeconds: 5, ReadOnly: false),
            new StringWriter(),
            stderr,
            CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(8));

        Assert.Equal(2, exit);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(2), $"took {clock.Elapsed}: it connected first");
        Assert.Contains($"--block-size {blockSize} is not a power of two from 512 to 4096", stderr.ToString(), StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(-1)]
    [InlineData(86401)]
    [InlineData(4294968)]
    [InlineData(int.MaxValue)]
    public async Task RunAsync_TimeoutOutOfRange_Exit2NamingTheRange(int seconds)
    {
        var stderr = new StringWriter();

        int exit = await ConnectCommand.RunAsync(
            new ConnectCommand.ConnectRequest("nbd://127.0.0.1:1/x", Device: null, Netlink: false, BlockSize: null, TimeoutSeconds: seconds, ReadOnly: false),
            new StringWriter(),
            stderr,
            CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(8));

        Assert.Equal(2, exit);
        Assert.Contains($"--timeout must be from 0 to 86400 seconds (one day), not {seconds}", stderr.ToString(), StringComparison.Ordinal);
    }
}

using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Nbd.Protocol.Tests.TestSupport;
using static Nbd.Protocol.Tests.TestSupport.ClientBytes;

namespace Nbd.Protocol.Tests.Client;

/// <summary>The public entry points over real sockets against an in-process fake server.</summary>
public sealed class NbdClientTests
{
    private const TransmissionFlags Rw = TransmissionFlags.HasFlags | TransmissionFlags.SendFlush;

    // Plays a fixed-newstyle server that checks each client message before answering GO.
    private static async Task GoServer(NetworkStream s, CancellationToken ct)
    {
        await s.WriteAsync(ServerScript.Newstyle(3).ToArray(), ct);
        Assert.Equal(Flags(3), await FakeServer.ReadAsync(s, 4, ct));
        byte[] go = Go("disk");
        Assert.Equal(go, await FakeServer.ReadAsync(s, go.Length, ct));
        await s.WriteAsync(new ServerScript().InfoExport(NbdOption.Go, 1 << 20, Rw).InfoBlockSize(NbdOption.Go, 512, 4096, 1 << 25).Ack(NbdOption.Go).ToArray(), ct);
        // Transmission: the first thing the client side would do is up to the kernel. Send a marker byte.
        await s.WriteAsync(new byte[] { 0x5A }, ct);
        var one = new byte[1];
        await s.ReadExactlyAsync(one, ct);
        Assert.Equal(0xA5, one[0]);
    }

    [Fact]
    public async Task ConnectAsync_Tcp_HandshakeThenSocketReadyForTransmission()
    {
        await using var server = FakeServer.Tcp(GoServer);

        using var connection = await NbdClient.ConnectAsync(server.Uri("disk"));

        Assert.Equal(new NbdExportInfo("disk", 1 << 20, Rw, new BlockSizeConstraints(512, 4096, 1 << 25), null), connection.Export);
        var socket = connection.DetachSocket();
        using (socket)
        {
            Assert.True(socket.Connected);
            // The byte after the handshake was not consumed by the client.
            var marker = new byte[1];
            Assert.Equal(1, await socket.ReceiveAsync(marker));
            Assert.Equal(0x5A, marker[0]);
            await socket.SendAsync(new byte[] { 0xA5 });
            await server.Completion.WaitAsync(TimeSpan.FromSeconds(5));
        }

        Assert.Throws<InvalidOperationException>(() => connection.Socket);
    }

    [Fact]
    public async Task ConnectAsync_UnixSocket_Works()
    {
        await using var server = FakeServer.Unix(GoServer);

        using var connection = await NbdClient.ConnectAsync(server.Uri("disk"));

        Assert.Equal(1UL << 20, connection.Export.Size);
        Assert.Equal(AddressFamily.Unix, connection.Socket.AddressFamily);
    }

    [Fact]
    public async Task ConnectAsync_AbstractUnixSocket_Works()
    {
        await using var server = FakeServer.Unix(GoServer, abstractNamespace: true);

        using var connection = await NbdClient.ConnectAsync(server.Uri("disk"));

        Assert.Equal(1UL << 20, connection.Export.Size);
    }

    [Fact]
    public async Task Dispose_WithoutDetach_ClosesSocket()
    {
        await using var server = FakeServer.Tcp(async (s, ct) =>
        {
            await s.WriteAsync(ServerScript.Oldstyle(4096, 1).ToArray(), ct);
            var b = new byte[1];
            Assert.Equal(0, await s.ReadAsync(b, ct)); // client closed
        });

        var connection = await NbdClient.ConnectAsync(server.Uri(""));
        connection.Dispose();

        await server.Completion.WaitAsync(TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task ListExportsAsync_Tcp_ListsThenAbortsPolitely()
    {
        await using var server = FakeServer.Tcp(async (s, ct) =>
        {
            await s.WriteAsync(ServerScript.Newstyle(3).ToArray(), ct);
            Assert.Equal(Concat(Flags(3), Option(NbdOption.List)), await FakeServer.ReadAsync(s, 20, ct));
            await s.WriteAsync(new ServerScript().Server("one", "first").Server("two").Ack(NbdOption.List).ToArray(), ct);
            Assert.Equal(Option(NbdOption.Abort), await FakeServer.ReadAsync(s, 16, ct));
            await s.WriteAsync(new ServerScript().Ack(NbdOption.Abort).ToArray(), ct);
            var b = new byte[1];
            Assert.Equal(0, await s.ReadAsync(b, ct));
        });

        var list = await NbdClient.ListExportsAsync(server.Uri(""));

        Assert.Equal([new NbdExportListing("one", "first"), new NbdExportListing("two", null)], list);
        await server.Completion.WaitAsync(TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task ListExportsAsync_IPv4MappedIPv6Address_ReachesTheIPv4Server()
    {
        // nbd://[::ffff:127.0.0.1]:PORT/ was "network unreachable": .NET's IPv6 sockets are IPV6_V6ONLY.
        await using var server = FakeServer.Tcp(async (s, ct) =>
        {
            await s.WriteAsync(ServerScript.Newstyle(3).ToArray(), ct);
            Assert.Equal(Concat(Flags(3), Option(NbdOption.List)), await FakeServer.ReadAsync(s, 4 + 16, ct));
            await s.WriteAsync(new ServerScript().Server("one").Ack(NbdOption.List).ToArray(), ct);
            Assert.Equal(Option(NbdOption.Abort), await FakeServer.ReadAsync(s, 16, ct));
            await s.WriteAsync(new ServerScript().Ack(NbdOption.Abort).ToArray(), ct);
        });
        int port = server.Uri("").Port;

        var list = await NbdClient.ListExportsAsync(NbdUri.Parse($"nbd://[::ffff:127.0.0.1]:{port}/"));

        Assert.Equal([new NbdExportListing("one", null)], list);
    }

    [Fact]
    public async Task GetInfoAsync_Unix_InfoThenAbort()
    {
        await using var server = FakeServer.Unix(async (s, ct) =>
        {
            await s.WriteAsync(ServerScript.Newstyle(3).ToArray(), ct);
            byte[] expected = Concat(Flags(3), Info("e x"));
            Assert.Equal(expected, await FakeServer.ReadAsync(s, expected.Length, ct));
            await s.WriteAsync(new ServerScript().InfoExport(NbdOption.Info, 10, TransmissionFlags.HasFlags | TransmissionFlags.ReadOnly).Ack(NbdOption.Info).ToArray(), ct);
            Assert.Equal(Option(NbdOption.Abort), await FakeServer.ReadAsync(s, 16, ct));
        });

        var info = await NbdClient.GetInfoAsync(server.Uri("e%20x"));

        Assert.Equal(new NbdExportInfo("e x", 10, TransmissionFlags.HasFlags | TransmissionFlags.ReadOnly, null, null), info);
        await server.Completion.WaitAsync(TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task ConnectAsync_TcpServerSilent_HandshakeTimeout()
    {
        await using var server = FakeServer.Tcp((s, ct) => Task.Delay(Timeout.Infinite, ct));
        var options = new NbdClientOptions { HandshakeTimeout = TimeSpan.FromMilliseconds(300) };
        var watch = Stopwatch.StartNew();

        var ex = await Assert.ThrowsAsync<NbdTimeoutException>(() => NbdClient.ConnectAsync(server.Uri("disk"), options));

        Assert.Equal(NbdTimeoutPhase.Handshake, ex.Phase);
        Assert.InRange(watch.Elapsed, TimeSpan.FromMilliseconds(250), TimeSpan.FromSeconds(5));
        Assert.StartsWith("127.0.0.1:", ex.Server, StringComparison.Ordinal);
    }

    [Fact]
    public async Task ConnectAsync_ServerRejectsExport_ServerErrorAndConnectionClosed()
    {
        await using var server = FakeServer.Tcp(async (s, ct) =>
        {
            await s.WriteAsync(ServerScript.Newstyle(3).ToArray(), ct);
            byte[] expected = Concat(Flags(3), Go("nope"));
            Assert.Equal(expected, await FakeServer.ReadAsync(s, expected.Length, ct));
            await s.WriteAsync(new ServerScript().Error(NbdOption.Go, NbdReplyType.ErrUnknown, "no such export").ToArray(), ct);
            Assert.Equal(Option(NbdOption.Abort), await FakeServer.ReadAsync(s, 16, ct));
            var b = new byte[1];
            Assert.Equal(0, await s.ReadAsync(b, ct)); // and then the client hung up
        });

        var ex = await Assert.ThrowsAsync<NbdServerErrorException>(() => NbdClient.ConnectAsync(server.Uri("nope")));

        Assert.Equal(NbdReplyType.ErrUnknown, ex.ReplyType);
        Assert.Equal("no such export", ex.ServerMessage);
        Assert.Equal("nope", ex.ExportName);
        Assert.Contains("NBD_REP_ERR_UNKNOWN: no such export", ex.Message, StringComparison.Ordinal);
        Assert.Contains($"server {ex.Server}, export 'nope'", ex.Message, StringComparison.Ordinal);
        await server.Completion.WaitAsync(TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task ConnectAsync_NothingListening_ConnectExceptionWithEndpoint()
    {
        int port;
        using (var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp))
        {
            probe.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            port = ((IPEndPoint)probe.LocalEndPoint!).Port;
        }

        var ex = await Assert.ThrowsAsync<NbdConnectException>(() => NbdClient.ConnectAsync(NbdUri.Parse($"nbd://127.0.0.1:{port}/x")));

        Assert.Equal(SocketError.ConnectionRefused, ex.SocketError);
        Assert.Equal($"127.0.0.1:{port}", ex.EndPoint);
        Assert.IsType<SocketException>(ex.InnerException);
    }

    [Fact]
    public async Task ConnectAsync_MissingUnixSocket_ConnectException()
    {
        string path = Path.Combine(Path.GetTempPath(), $"nbd-missing-{Guid.NewGuid():N}.sock");

        var ex = await Assert.ThrowsAsync<NbdConnectException>(() => NbdClient.ConnectAsync(NbdUri.Parse($"nbd+unix:///x?socket={path}")));

        Assert.Equal($"unix:{path}", ex.EndPoint);
        // ENOENT, which .NET calls AddressNotAvailable ("Cannot assign requested address"): the message says what it is.
        Assert.Equal(SocketError.AddressNotAvailable, ex.SocketError);
        Assert.StartsWith($"Cannot connect to unix:{path}: no such socket file (ENOENT): is the server running, and is {path} where it listens?", ex.Message, StringComparison.Ordinal);
        Assert.DoesNotContain("assign", ex.Message, StringComparison.OrdinalIgnoreCase);
    }

    [Fact]
    public async Task ConnectAsync_UnixSocketFileNobodyListensOn_SaysNothingListens()
    {
        // Bound, never listening: what connect(2) finds at the file a crashed server left (ECONNREFUSED).
        string path = Path.Combine(Path.GetTempPath(), $"nbd-stale-{Guid.NewGuid():N}.sock");
        using var cleanup = new DeleteOnDispose(path);
        using var bound = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        bound.Bind(new UnixDomainSocketEndPoint(path));

        var ex = await Assert.ThrowsAsync<NbdConnectException>(() => NbdClient.ConnectAsync(NbdUri.Parse($"nbd+unix:///x?socket={path}")));

        Assert.Equal(SocketError.ConnectionRefused, ex.SocketError);
        Assert.StartsWith($"Cannot connect to unix:{path}: nothing listens on {path} (ECONNREFUSED): a server that ended may have left its socket file behind, or the file is no socket.", ex.Message, StringComparison.Ordinal);
    }

    /// <summary>connect(2) to a directory says ECONNREFUSED: it said "nothing listens on the socket file".</summary>
    [Fact]
    public async Task ConnectAsync_UnixSocketPathIsADirectory_SaysSo()
    {
        string path = Path.Combine(Path.GetTempPath(), $"nbd-dir-{Guid.NewGuid():N}");
        Directory.CreateDirectory(path);
        try
        {
            var ex = await Assert.ThrowsAsync<NbdConnectException>(() => NbdClient.ConnectAsync(NbdUri.Parse($"nbd+unix:///x?socket={path}")));

            Assert.Equal($"{path} is a directory, not a socket (ECONNREFUSED)", ex.Reason);
        }
        finally
        {
            Directory.Delete(path);
        }
    }

    [Fact]
    public async Task ConnectAsync_BacklogFull_ConnectTimeout()
    {
        using var blackhole = await Blackhole.CreateAsync();
        var options = new NbdClientOptions { ConnectTimeout = TimeSpan.FromMilliseconds(300) };
        var watch = Stopwatch.StartNew();

        var ex = await Assert.ThrowsAsync<NbdTimeoutException>(() => NbdClient.ConnectAsync(NbdUri.Parse($"nbd://127.0.0.1:{blackhole.EndPoint.Port}/x"), options));

        Assert.Equal(NbdTimeoutPhase.Connect, ex.Phase);
        Assert.InRange(watch.Elapsed, TimeSpan.FromMilliseconds(250), TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task ConnectFirst_FirstAddressNeverAnswers_SecondConnectsWithinTheBudget()
    {
        // A host name whose first address is blackholed (a broken IPv6 route listed first): the next address gets its
        // turn inside the same budget instead of the first one using all of it.
        using var blackhole = await Blackhole.CreateAsync();
        using var good = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        good.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        good.Listen();
        var watch = Stopwatch.StartNew();

        using Socket socket = NbdClient.ConnectFirst([blackhole.EndPoint, (IPEndPoint)good.LocalEndPoint!], TimeSpan.FromSeconds(4), TimeProvider.System, CancellationToken.None);

        Assert.Equal(good.LocalEndPoint, socket.RemoteEndPoint);
        // The first address had half of the 4 s.
        Assert.InRange(watch.Elapsed, TimeSpan.FromSeconds(1.9), TimeSpan.FromSeconds(4));
    }

    /// <summary>A listener that never accepts, with its accept queue filled: Linux drops further SYNs, so connect hangs.</summary>
    private sealed class Blackhole : IDisposable
    {
        private readonly Socket _listener = new(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        private readonly List<Socket> _fillers = [];

        public IPEndPoint EndPoint => (IPEndPoint)_listener.LocalEndPoint!;

        public static async Task<Blackhole> CreateAsync()
        {
            var hole = new Blackhole();
            hole._listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            hole._listener.Listen(0);
            // Fill the queue until a connect attempt no longer completes quickly.
            for (int i = 0; i < 8; i++)
            {
                var filler = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
                hole._fillers.Add(filler);
                // A loopback connect into a queue with room completes in microseconds; one second means the queue is full.
                using var quick = new CancellationTokenSource(TimeSpan.FromSeconds(1));
                try
                {
                    await filler.ConnectAsync(hole.EndPoint, quick.Token);
                }
                catch (OperationCanceledException)
                {
                    break;
                }
            }

            return hole;
        }

        public void Dispose()
        {
            _fillers.ForEach(f => f.Dispose());
            _listener.Dispose();
        }
    }

    [Fact]
    public async Task ConnectAsync_UnresolvableHost_ConnectException()
    {
        var ex = await Assert.ThrowsAsync<NbdConnectException>(() => NbdClient.ConnectAsync(NbdUri.Parse("nbd://no-such-host.invalid/x")));

        Assert.Equal("no-such-host.invalid:10809", ex.EndPoint);
    }

    private sealed class DeleteOnDispose(string path) : IDisposable
    {
        public void Dispose() => File.Delete(path);
    }
}

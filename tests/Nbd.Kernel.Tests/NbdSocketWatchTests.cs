using System.Net;
using System.Net.Sockets;

namespace Nbd.Kernel.Tests;

/// <summary>
/// <see cref="NbdSocketWatch"/> on real loopback connections of the host kernel: what ends a connection is seen,
/// what does not is not, and the watch never consumes data or changes the connection it watches.
/// </summary>
public sealed class NbdSocketWatchTests : IDisposable
{
    private static readonly TimeSpan Seen = TimeSpan.FromSeconds(5);
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(300);
    private readonly List<Socket> _sockets = [];

    public void Dispose()
    {
        foreach (Socket socket in _sockets)
        {
            socket.Dispose();
        }
    }

    [Fact]
    public async Task Ended_HealthyConnectionWithUnreadData_NeverCompletesAndLeavesTheDataToTheReader()
    {
        (Socket ours, Socket server) = ConnectedPair();
        using var watch = NbdSocketWatch.Start([ours]);
        server.Send("reply"u8);

        await Task.Delay(Quiet);
        Assert.False(watch.Ended.IsCompleted);
        byte[] buffer = new byte[16];
        Assert.Equal("reply", System.Text.Encoding.ASCII.GetString(buffer, 0, ours.Receive(buffer)));
    }

    [Fact]
    public async Task Ended_ServerClosesItsSide_PeerClosed()
    {
        (Socket ours, Socket server) = ConnectedPair();
        using var watch = NbdSocketWatch.Start([ours]);

        server.Shutdown(SocketShutdown.Send);

        Assert.Equal(new NbdSocketEnd(0, NbdSocketEndReason.PeerClosed), await watch.Ended.WaitAsync(Seen));
    }

    [Fact]
    public async Task Ended_ServerResets_Error()
    {
        (Socket ours, Socket server) = ConnectedPair();
        using var watch = NbdSocketWatch.Start([ours]);

        server.LingerState = new LingerOption(true, 0);
        server.Close(); // RST

        Assert.Equal(new NbdSocketEnd(0, NbdSocketEndReason.Error), await watch.Ended.WaitAsync(Seen));
    }

    [Fact]
    public async Task Ended_ShutDownLocallyAsTheDriverDoesWhenItMarksTheConnectionDead_Closed()
    {
        (Socket ours, _) = ConnectedPair();
        using var watch = NbdSocketWatch.Start([ours]);

        ours.Shutdown(SocketShutdown.Both);

        Assert.Equal(new NbdSocketEnd(0, NbdSocketEndReason.Closed), await watch.Ended.WaitAsync(Seen));
    }

    [Fact]
    public async Task Ended_SecondOfTwoEnds_ReportsItsIndex()
    {
        (Socket first, _) = ConnectedPair();
        (Socket second, Socket secondServer) = ConnectedPair();
        using var watch = NbdSocketWatch.Start([first, second]);

        secondServer.Shutdown(SocketShutdown.Send);

        Assert.Equal(1, (await watch.Ended.WaitAsync(Seen)).Index);
    }

    [Fact]
    public async Task Ended_UnixSocketPeerCloses_Closed()
    {
        var path = Path.Combine(Path.GetTempPath(), $"nbd-watch-{Guid.NewGuid():N}.sock");
        using var listener = Track(new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified));
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen();
        try
        {
            Socket ours = Track(new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified));
            ours.Connect(new UnixDomainSocketEndPoint(path));
            Socket server = Track(listener.Accept());
            using var watch = NbdSocketWatch.Start([ours]);

            server.Close();

            // A unix peer's close shuts both directions of our end at once (POLLHUP), unlike TCP's FIN.
            Assert.Equal(NbdSocketEndReason.Closed, (await watch.Ended.WaitAsync(Seen)).Reason);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public async Task Dispose_CancelsClosesItsDuplicatesAndLeavesTheConnectionUp()
    {
        (Socket ours, Socket server) = ConnectedPair();
        var watch = NbdSocketWatch.Start([ours]);
        int duplicate = watch.Descriptors[0];
        Assert.Equal(Target(checked((int)ours.Handle)), Target(duplicate));

        watch.Dispose();

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => watch.Ended);
        Assert.True(watch.WatchThread.Join(Seen), "the watch thread did not leave poll(2)");
        Assert.NotEqual(Target(checked((int)ours.Handle)), Target(duplicate)); // closed (or the number reused by someone else)
        // Still connected both ways: the peer saw neither FIN nor RST.
        ours.Send("ping"u8);
        byte[] buffer = new byte[8];
        Assert.Equal(4, server.Receive(buffer));
        server.Send("pong"u8);
        Assert.Equal(4, ours.Receive(buffer));
    }

    [Fact]
    public async Task Ended_ThreadLeavesAndClosesItsDescriptorsOnItsOwn()
    {
        (Socket ours, Socket server) = ConnectedPair();
        var watch = NbdSocketWatch.Start([ours]);
        int duplicate = watch.Descriptors[0];

        server.Shutdown(SocketShutdown.Send);
        await watch.Ended.WaitAsync(Seen);

        Assert.True(watch.WatchThread.Join(Seen));
        Assert.NotEqual(Target(checked((int)ours.Handle)), Target(duplicate));
        watch.Dispose(); // after the thread closed everything: must not write to a closed (or reused) eventfd
        Assert.Equal(NbdSocketEndReason.PeerClosed, (await watch.Ended).Reason);
    }

    [Fact]
    public async Task Ended_AfterTheWatchedSocketWasDisposedByItsOwner_StillSeesTheEndThroughItsDuplicate()
    {
        (Socket ours, Socket server) = ConnectedPair();
        using var watch = NbdSocketWatch.Start([ours]);
        ours.Dispose(); // our process lets go; the duplicate (like the driver's reference) keeps the socket

        await Task.Delay(Quiet);
        Assert.False(watch.Ended.IsCompleted);
        server.Shutdown(SocketShutdown.Send);

        Assert.Equal(NbdSocketEndReason.PeerClosed, (await watch.Ended.WaitAsync(Seen)).Reason);
    }

    private (Socket Ours, Socket Server) ConnectedPair()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen();
        Socket ours = Track(new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp));
        ours.Connect(listener.LocalEndPoint!);
        Socket server = Track(listener.Accept());
        return (ours, server);
    }

    private Socket Track(Socket socket)
    {
        _sockets.Add(socket);
        return socket;
    }

    /// <summary>What /proc/self/fd/N points at ("socket:[inode]"), or "" when N is not open.</summary>
    private static string Target(int fd)
    {
        try
        {
            return new FileInfo($"/proc/self/fd/{fd}").LinkTarget ?? "";
        }
        catch (IOException)
        {
            return "";
        }
    }
}

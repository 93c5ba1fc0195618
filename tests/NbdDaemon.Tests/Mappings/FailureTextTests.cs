using Nbd.Protocol;
using NbdDaemon.Mappings;

namespace NbdDaemon.Tests.Mappings;

/// <summary>The few words STATUS= and the reconnect lines show for a failure, from real connect failures.</summary>
public sealed class FailureTextTests
{
    [Fact]
    public async Task Describe_MissingUnixSocket_NoSuchSocketFileAndWhereToLook()
    {
        using var dir = new TempDirectory();
        string path = dir.File("absent.sock");

        var ex = await Assert.ThrowsAsync<NbdConnectException>(() => NbdClient.ConnectAsync(NbdUri.Parse($"nbd+unix:///x?socket={path}")));

        // Not "address not available", .NET's word for ENOENT.
        Assert.Equal($"no such socket file (ENOENT): is the server running, and is {path} where it listens?", FailureText.Describe(ex));
    }

    [Fact]
    public async Task Describe_TcpRefused_ConnectionRefused()
    {
        int port;
        using (var probe = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.InterNetwork, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Tcp))
        {
            probe.Bind(new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, 0));
            port = ((System.Net.IPEndPoint)probe.LocalEndPoint!).Port;
        }

        var ex = await Assert.ThrowsAsync<NbdConnectException>(() => NbdClient.ConnectAsync(NbdUri.Parse($"nbd://127.0.0.1:{port}/x")));

        Assert.Equal("connection refused", FailureText.Describe(ex));
    }

    [Fact]
    public void Describe_Timeouts_SayWhatWasAwaited()
    {
        var seconds = TimeSpan.FromSeconds(10);

        Assert.Equal("connect timed out after 10 s", FailureText.Describe(new NbdTimeoutException(NbdTimeoutPhase.Connect, seconds)));
        Assert.Equal(
            "handshake timed out after 10 s: the connection was accepted, but no NBD greeting came (is an NBD server listening there, and is it stuck?)",
            FailureText.Describe(new NbdTimeoutException(NbdTimeoutPhase.Handshake, seconds, awaiting: "the server greeting (NBDMAGIC + magic)") { NoGreeting = true }));
        Assert.Equal(
            "handshake timed out after 10 s waiting for the reply header to NBD_OPT_GO",
            FailureText.Describe(new NbdTimeoutException(NbdTimeoutPhase.Handshake, seconds, awaiting: "the reply header to NBD_OPT_GO")));
        Assert.Equal("handshake timed out after 2.5 s", FailureText.Describe(new NbdTimeoutException(NbdTimeoutPhase.Handshake, TimeSpan.FromSeconds(2.5))));
    }
}

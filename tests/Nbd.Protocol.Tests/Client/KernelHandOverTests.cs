using System.Net.Sockets;
using System.Runtime.InteropServices;
using Nbd.Protocol.Tests.TestSupport;
using static Nbd.Protocol.Tests.TestSupport.ClientBytes;

namespace Nbd.Protocol.Tests.Client;

/// <summary>
/// The socket handed to the kernel must never have joined the runtime's epoll loop, or every packet the nbd driver
/// moves on it wakes managed threads (half of nbd-client's throughput in the VM). The runtime switches a socket's
/// descriptor to O_NONBLOCK when it registers it for async I/O, so a descriptor still blocking proves it never was.
/// </summary>
public sealed partial class KernelHandOverTests
{
    private const int FGetFl = 3;
    private const int ONonBlock = 0x800;

    [LibraryImport("libc", SetLastError = true)]
    private static partial int fcntl(int fd, int cmd);

    private static async Task GoServer(NetworkStream s, CancellationToken ct)
    {
        await s.WriteAsync(ServerScript.Newstyle(3).ToArray(), ct);
        await FakeServer.ReadAsync(s, 4, ct);
        byte[] go = Go("disk");
        await FakeServer.ReadAsync(s, go.Length, ct);
        await s.WriteAsync(new ServerScript().InfoExport(NbdOption.Go, 1 << 20, TransmissionFlags.HasFlags).Ack(NbdOption.Go).ToArray(), ct);
        await s.ReadExactlyAsync(new byte[1], ct);
    }

    [Fact]
    public async Task ConnectAsync_Tcp_DescriptorNeverJoinedTheAsyncEngine()
    {
        await using var server = FakeServer.Tcp(GoServer);

        using var connection = await NbdClient.ConnectAsync(server.Uri("disk"));

        AssertBlocking(connection.Socket);
        Assert.Equal(0, connection.Socket.SendTimeout);
        connection.Socket.Send(new byte[] { 1 });
        await server.Completion.WaitAsync(TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task ConnectAsync_UnixSocket_DescriptorNeverJoinedTheAsyncEngine()
    {
        await using var server = FakeServer.Unix(GoServer);

        using var connection = await NbdClient.ConnectAsync(server.Uri("disk"));

        AssertBlocking(connection.Socket);
        connection.Socket.Send(new byte[] { 1 });
        await server.Completion.WaitAsync(TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task AsyncReceive_OnAnotherSocket_MakesItNonBlocking()
    {
        // The premise of the check above: an async operation does flip the descriptor.
        await using var server = FakeServer.Tcp(GoServer);
        using var connection = await NbdClient.ConnectAsync(server.Uri("disk"));
        using var cts = new CancellationTokenSource();
        var pending = connection.Socket.ReceiveAsync(new byte[1], SocketFlags.None, cts.Token);

        Assert.NotEqual(0, fcntl((int)connection.Socket.Handle, FGetFl) & ONonBlock);
        await cts.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await pending);
        connection.Socket.Send(new byte[] { 1 });
        await server.Completion.WaitAsync(TimeSpan.FromSeconds(5));
    }

    private static void AssertBlocking(Socket socket)
    {
        int flags = fcntl((int)socket.Handle, FGetFl);
        Assert.True(flags >= 0, $"fcntl(F_GETFL) failed: errno {Marshal.GetLastPInvokeError()}");
        Assert.Equal(0, flags & ONonBlock);
    }
}

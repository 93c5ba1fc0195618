using System.Net;
using System.Net.Sockets;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel.Tests;

public sealed class NbdDeviceTests
{
    private const int PageSize = 4096;

    private static (NbdDevice Device, FakeNbdDeviceControl Control) Create(string path = "/dev/nbd0")
    {
        var control = new FakeNbdDeviceControl();
        return (NbdDevice.Open(path, _ => (control, 0), PageSize), control);
    }

    private static (Socket Client, Socket Server) ConnectedTcpPair()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        client.Connect(listener.LocalEndPoint!);
        return (client, listener.Accept());
    }

    [Fact]
    public void Open_PathAndIndex_Parsed()
    {
        var (device, _) = Create("/dev/nbd12");
        Assert.Equal("/dev/nbd12", device.Path);
        Assert.Equal(12, device.Index);
        Assert.Equal(1024u, device.BlockSize);
    }

    [Theory]
    [InlineData("/dev/sda")]
    [InlineData("/dev/nbd")]
    [InlineData("/dev/nbd0p1")]
    public void Open_NotAnNbdNode_ThrowsArgumentException(string path) =>
        Assert.Throws<ArgumentException>(() => NbdDevice.Open(path, _ => throw new InvalidOperationException("must not open"), PageSize));

    [Fact]
    public void Open_MissingNodeForReal_ThrowsTypedEnoentWithHint()
    {
        string path = Path.Combine(Path.GetTempPath(), "no-such-dir-" + Guid.NewGuid().ToString("N"), "nbd7");
        var ex = Assert.Throws<NbdKernelException>(() => NbdDevice.Open(path));
        Assert.Equal(Errno.ENOENT, ex.Errno);
        Assert.Equal("ENOENT", ex.ErrnoName);
        Assert.Equal("open", ex.Operation);
        Assert.Equal(path, ex.Device);
        Assert.Contains("modprobe nbd", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Open_RegularFileForReal_IoctlFailsWithEnotty()
    {
        // A real descriptor that is not an nbd device: the ioctl reaches the kernel and comes back ENOTTY.
        string dir = Directory.CreateTempSubdirectory("nbd-fake-node-").FullName;
        try
        {
            string path = Path.Combine(dir, "nbd3");
            File.WriteAllBytes(path, []);
            using var device = NbdDevice.Open(path);
            var ex = Assert.Throws<NbdKernelException>(() => device.SetFlags(1));
            Assert.Equal(Errno.ENOTTY, ex.Errno);
            Assert.StartsWith($"{path}: NBD_SET_FLAGS failed: ENOTTY (", ex.Message, StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    [Fact]
    public void SetSocket_Udp_RefusedBeforeKernel()
    {
        var (device, control) = Create();
        using var udp = new Socket(AddressFamily.InterNetwork, SocketType.Dgram, ProtocolType.Udp);
        udp.Connect(new IPEndPoint(IPAddress.Loopback, 9));
        var ex = Assert.Throws<ArgumentException>(() => device.SetSocket(udp));
        Assert.Contains("stream", ex.Message, StringComparison.Ordinal);
        Assert.Empty(control.Calls);
    }

    [Fact]
    public void SetSocket_UnconnectedTcp_RefusedBeforeKernel()
    {
        var (device, control) = Create();
        using var tcp = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        Assert.Throws<ArgumentException>(() => device.SetSocket(tcp));
        Assert.Empty(control.Calls);
    }

    [Fact]
    public void SetSocket_ConnectedTcp_IssuesSetSock()
    {
        var (device, control) = Create();
        var (client, server) = ConnectedTcpPair();
        using (client)
        using (server)
        {
            device.SetSocket(client);
        }
        Assert.Equal(NbdConstants.NBD_SET_SOCK, Assert.Single(control.Calls).Request);
    }

    [Fact]
    public void SetSocket_ConnectedUnixStream_Accepted()
    {
        var (device, control) = Create();
        string path = Path.Combine(Path.GetTempPath(), $"nbd-{Guid.NewGuid():N}.sock");
        try
        {
            using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            listener.Bind(new UnixDomainSocketEndPoint(path));
            listener.Listen(1);
            using var client = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            client.Connect(new UnixDomainSocketEndPoint(path));
            using var accepted = listener.Accept();
            device.SetSocket(client);
        }
        finally
        {
            File.Delete(path);
        }
        Assert.Single(control.Calls);
    }

    [Fact]
    public void SetSockets_OneInvalid_NoneSet_ElseAllSet()
    {
        var (device, control) = Create();
        var (c1, s1) = ConnectedTcpPair();
        var (c2, s2) = ConnectedTcpPair();
        using var unconnected = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        using (c1) using (s1) using (c2) using (s2)
        {
            Assert.Throws<ArgumentException>(() => device.SetSockets([c1, unconnected]));
            Assert.Empty(control.Calls);
            Assert.Throws<ArgumentException>(() => device.SetSockets([]));
            device.SetSockets([c1, c2]);
        }
        Assert.Equal([NbdConstants.NBD_SET_SOCK, NbdConstants.NBD_SET_SOCK], control.Calls.Select(c => c.Request));
    }

    [Fact]
    public void SetSocket_CallersTimeoutsOnTheSocket_ClearedBeforeTheKernelGetsIt()
    {
        // The driver's receive thread reads with SO_RCVTIMEO: a handshake deadline left on the socket would end an
        // idle device's connection after that long ("Receive control failed").
        var (device, control) = Create();
        var (client, server) = ConnectedTcpPair();
        using (client)
        using (server)
        {
            NbdSocketTimeout.Set(client, TimeSpan.FromSeconds(7), NbdSocketTimeout.Direction.Receive);
            NbdSocketTimeout.Set(client, TimeSpan.FromSeconds(9));
            Assert.Equal(TimeSpan.FromSeconds(7), NbdSocketTimeout.Read(client, NbdSocketTimeout.Direction.Receive));

            device.SetSocket(client);

            Assert.Equal(TimeSpan.Zero, NbdSocketTimeout.Read(client, NbdSocketTimeout.Direction.Receive));
            Assert.Equal(TimeSpan.Zero, NbdSocketTimeout.Read(client));
        }
        Assert.Single(control.Calls);
    }

    [Fact]
    public void SetSocket_SameConnectionTwice_RefusedBeforeKernel()
    {
        // Two slots on one stream would have two receive threads taking each other's replies; a dup(2) of the descriptor
        // is the same connection too.
        var (device, control) = Create();
        var (client, server) = ConnectedTcpPair();
        using (client)
        using (server)
        {
            device.SetSocket(client);
            var again = Assert.Throws<ArgumentException>(() => device.SetSocket(client));
            Assert.Contains("already has", again.Message, StringComparison.Ordinal);
            using var duplicate = new Socket(new SafeSocketHandle(Duplicate(client), ownsHandle: true));
            Assert.Throws<ArgumentException>(() => device.SetSocket(duplicate));
            Assert.Throws<ArgumentException>(() => Create().Device.SetSockets([client, duplicate]));
        }
        Assert.Single(control.Calls);
    }

    private static nint Duplicate(Socket socket) =>
        Dup((int)socket.Handle) is int fd and >= 0 ? fd : throw new InvalidOperationException("dup failed");

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "dup", SetLastError = true)]
    private static extern int Dup(int fd);

    [Fact]
    public void SetSocket_KernelSaysEbusy_TypedExceptionWithExactMessage()
    {
        var (device, control) = Create("/dev/nbd0");
        control.Errors[NbdConstants.NBD_SET_SOCK] = Errno.EBUSY;
        var (client, server) = ConnectedTcpPair();
        using (client)
        using (server)
        {
            var ex = Assert.Throws<NbdKernelException>(() => device.SetSocket(client));
            Assert.Equal("/dev/nbd0: NBD_SET_SOCK failed: EBUSY (Device or resource busy)", ex.Message);
            Assert.Equal("NBD_SET_SOCK", ex.Operation);
            Assert.Equal(16, ex.Errno);
        }
    }

    [Theory]
    [InlineData(0u)]
    [InlineData(256u)]
    [InlineData(1000u)]
    [InlineData(8192u)]
    [InlineData(3072u)]
    public void SetBlockSize_Invalid_RefusedBeforeKernel(uint bytes)
    {
        var (device, control) = Create();
        Assert.Throws<ArgumentOutOfRangeException>(() => device.SetBlockSize(bytes));
        Assert.Empty(control.Calls);
        Assert.Equal(1024u, device.BlockSize);
    }

    [Theory]
    [InlineData(512u)]
    [InlineData(1024u)]
    [InlineData(4096u)]
    public void SetBlockSize_Valid_IssuesSetBlksize(uint bytes)
    {
        var (device, control) = Create();
        device.SetBlockSize(bytes);
        Assert.Equal((NbdConstants.NBD_SET_BLKSIZE, (ulong)bytes), Assert.Single(control.Calls));
        Assert.Equal(bytes, device.BlockSize);
    }

    [Fact]
    public void SetSizeBytes_NotMultipleOfBlock_RoundsDown()
    {
        var (device, control) = Create();
        device.SetBlockSize(4096);
        ulong actual = device.SetSizeBytes(10_000);
        Assert.Equal(8192ul, actual);
        Assert.Equal((NbdConstants.NBD_SET_SIZE_BLOCKS, 2ul), control.Calls[^1]);
    }

    [Fact]
    public void SetSizeBytes_DefaultBlockSize_UsesKernelDefault1024()
    {
        var (device, control) = Create();
        Assert.Equal(0ul, device.SetSizeBytes(1023));
        Assert.Equal(1024ul * 5, device.SetSizeBytes(5 * 1024 + 1));
        Assert.Equal((NbdConstants.NBD_SET_SIZE_BLOCKS, 5ul), control.Calls[^1]);
    }

    [Fact]
    public void SetSizeBlocks_TheBlockSizeItCountsInGoesToTheKernelFirst()
    {
        // A configuration held by another opener keeps its last block size (4096): 5 blocks counted in the default
        // 1024 would have made a device of 20 KiB.
        var (device, control) = Create();
        device.SetSizeBlocks(5);
        Assert.Equal([(NbdConstants.NBD_SET_BLKSIZE, 1024ul), (NbdConstants.NBD_SET_SIZE_BLOCKS, 5ul)], control.Calls);
    }

    [Theory]
    [InlineData(1UL << 30, 4096u, 1UL << 30)]
    [InlineData((1UL << 30) + 2048, 4096u, 1UL << 30)]
    [InlineData(4095UL, 4096u, 0UL)]
    [InlineData(ulong.MaxValue, 512u, ulong.MaxValue - 511)]
    public void WholeBlocks_RoundsDownToTheBlockSize(ulong bytes, uint blockSize, ulong expected)
    {
        Assert.Equal(expected, NbdDevice.WholeBlocks(bytes, blockSize));
    }

    [Fact]
    public void WholeBlocks_ZeroBlockSize_Refused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => NbdDevice.WholeBlocks(4096, 0));
    }

    [Fact]
    public void SetSizeBlocks_Overflow_RefusedBeforeKernel()
    {
        var (device, control) = Create();
        device.SetBlockSize(4096);
        Assert.Throws<ArgumentOutOfRangeException>(() => device.SetSizeBlocks(ulong.MaxValue / 4096));
        Assert.Single(control.Calls);
    }

    [Fact]
    public void SetTimeout_WholeSeconds_IssuedFractionalOrNegativeRefused()
    {
        var (device, control) = Create();
        device.SetTimeout(TimeSpan.FromSeconds(30));
        Assert.Throws<ArgumentOutOfRangeException>(() => device.SetTimeout(TimeSpan.FromMilliseconds(1500)));
        Assert.Throws<ArgumentOutOfRangeException>(() => device.SetTimeout(TimeSpan.FromSeconds(-1)));
        // seconds * HZ (≤ 1000) must fit the driver's 32-bit jiffies: 17179870 s at HZ=250 would wrap to about 0.8 s.
        device.SetTimeout(TimeSpan.FromSeconds(4294967));
        Assert.Throws<ArgumentOutOfRangeException>(() => device.SetTimeout(TimeSpan.FromSeconds(4294968)));
        Assert.Throws<ArgumentOutOfRangeException>(() => device.SetTimeout(TimeSpan.FromSeconds(17179870)));
        Assert.Equal([(NbdConstants.NBD_SET_TIMEOUT, 30ul), (NbdConstants.NBD_SET_TIMEOUT, 4294967ul)], control.Calls);
    }

    [Fact]
    public void Disconnect_ServerStoppedReading_SocketsShutDownAfterTheGraceSoItReturns()
    {
        // The driver's NBD_CMD_DISC waits behind a request send that a server which stopped reading blocks (for ever
        // when no request timeout is set): the socket shut down under it is what lets the disconnect, and a stop, end.
        var (device, control) = Create();
        var (client, server) = ConnectedTcpPair();
        using (client)
        using (server)
        using (var release = new ManualResetEventSlim())
        {
            device.SetSocket(client);
            device.DisconnectGrace = TimeSpan.FromMilliseconds(300);
            control.DisconnectRelease = release;
            // The peer on a thread of its own, already blocked in recv: on the pool it could start later than the 300 ms
            // the disconnect then waits for the (fake) kernel to return, and the disconnect would time out (a CI flake).
            int received = -1;
            var peer = new Thread(() =>
            {
                received = server.Receive(new byte[1]);
                release.Set();
            });
            peer.Start();

            var stopwatch = System.Diagnostics.Stopwatch.StartNew();
            device.Disconnect();

            Assert.InRange(stopwatch.Elapsed, TimeSpan.FromMilliseconds(280), TimeSpan.FromSeconds(10));
            Assert.True(peer.Join(TimeSpan.FromSeconds(10)));
            Assert.Equal(0, received); // the server saw our FIN
        }
    }

    [Fact]
    public void Disconnect_CallerClosedItsSocketAfterHandingItOver_StillShutDownAfterTheGrace()
    {
        // The kernel keeps its own reference, so closing one's descriptor after NBD_SET_SOCK looks harmless; the device's
        // own duplicate is what a stuck disconnect is then cut short with (before, a shut down of the disposed Socket threw
        // ObjectDisposedException, was ignored, and the disconnect, and a stop, hung).
        var (device, control) = Create();
        var (client, server) = ConnectedTcpPair();
        using var kernelsReference = new Socket(new SafeSocketHandle(Duplicate(client), ownsHandle: true)); // what NBD_SET_SOCK takes
        using (server)
        using (var release = new ManualResetEventSlim())
        {
            device.SetSocket(client);
            client.Dispose();
            device.DisconnectGrace = TimeSpan.FromMilliseconds(300);
            control.DisconnectRelease = release;
            int received = -1;
            var peer = new Thread(() =>
            {
                try
                {
                    received = server.Receive(new byte[1]);
                    release.Set();
                }
                catch (SocketException)
                {
                    // The test failed and closed the server end: nothing to report from here.
                }
            });
            peer.Start();

            device.Disconnect();

            Assert.True(peer.Join(TimeSpan.FromSeconds(10)));
            Assert.Equal(0, received);
        }
    }

    [Fact]
    public async Task Stop_DisconnectStuckInTheKernel_NoClearSockBehindIt()
    {
        // A disconnect stuck in the driver holds config_lock; NBD_CLEAR_SOCK would wait for it uninterruptibly, for ever.
        var (device, control) = Create();
        using var never = new ManualResetEventSlim();
        control.DisconnectRelease = never;
        device.DisconnectGrace = TimeSpan.FromMilliseconds(100);
        var loop = device.StartServiceLoop();
        await WaitUntil(() => control.HasCall(NbdConstants.NBD_DO_IT));

        await Task.Run(loop.Stop).WaitAsync(TimeSpan.FromSeconds(10));
        device.Dispose(); // no second NBD_DISCONNECT behind the first either: it would wait on config_lock too

        Assert.DoesNotContain(NbdConstants.NBD_CLEAR_SOCK, control.Calls.Select(c => c.Request));
        Assert.Single(control.Calls, c => c.Request == NbdConstants.NBD_DISCONNECT);
        never.Set();
    }

    [Fact]
    public void Disconnect_KernelAnswersPromptly_SocketLeftAlone()
    {
        var (device, _) = Create();
        var (client, server) = ConnectedTcpPair();
        using (client)
        using (server)
        {
            device.SetSocket(client);
            device.Disconnect();
            Assert.False(server.Poll(TimeSpan.FromMilliseconds(200), SelectMode.SelectRead), "the socket was shut down");
        }
    }

    [Fact]
    public void SetFlagsDisconnectClearQueue_IssueTheirRequests()
    {
        var (device, control) = Create();
        device.SetFlags(0x0103);
        device.ClearQueue();
        device.ClearSocket();
        device.Disconnect();
        Assert.Equal(
            [(NbdConstants.NBD_SET_FLAGS, 0x103ul), (NbdConstants.NBD_CLEAR_QUE, 0ul), (NbdConstants.NBD_CLEAR_SOCK, 0ul), (NbdConstants.NBD_DISCONNECT, 0ul)],
            control.Calls);
    }

    [Fact]
    public async Task StartServiceLoop_Stop_DisconnectsClearsAndReportsStoppedByRequest()
    {
        var (device, control) = Create("/dev/nbd4");
        var loop = device.StartServiceLoop();
        await WaitUntil(() => control.HasCall(NbdConstants.NBD_DO_IT));
        Assert.False(loop.Completion.IsCompleted);

        loop.Stop();
        var result = await loop.Completion.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.Equal(new NbdServiceLoopResult(true, 0, null), result);
        Assert.Equal("nbd4 DO_IT", control.DoItThreadName);
        Assert.False(control.DoItOnThreadPool);
        Assert.Equal([NbdConstants.NBD_DO_IT, NbdConstants.NBD_DISCONNECT, NbdConstants.NBD_CLEAR_SOCK], control.Calls.Select(c => c.Request));
    }

    /// <summary>
    /// The driver restarts an interrupted NBD_DO_IT (a stop signal, a tracer attaching), and the restarted call finds
    /// the device still marked running: EBUSY (the VM step stopcont of daemon-device.sh, "shutting down sockets").
    /// </summary>
    [Fact]
    public void RunServiceLoop_EbusyOnTheSocketsItSet_Interrupted()
    {
        var (device, control) = Create();
        control.DoItBody = () => Errno.EBUSY;
        var (client, server) = ConnectedTcpPair();
        using (client)
        using (server)
        {
            device.SetSocket(client);
            var result = device.RunServiceLoop();

            Assert.True(result.Interrupted);
            Assert.False(result.StoppedByRequest);
            Assert.StartsWith("interrupted: the process was stopped, traced or frozen", result.Description, StringComparison.Ordinal);

            // A second run of the same session is the caller's misuse ("already running"), not an interruption.
            Assert.False(device.RunServiceLoop().Interrupted);
        }
    }

    [Fact]
    public void RunServiceLoop_EbusyWithoutSocketsOfItsOwn_NotInterrupted()
    {
        var (device, control) = Create();
        control.DoItBody = () => Errno.EBUSY;

        var result = device.RunServiceLoop();

        Assert.Equal(Errno.EBUSY, result.Errno);
        Assert.False(result.Interrupted);
        Assert.Null(result.Description);
    }

    [Fact]
    public async Task StartServiceLoop_EndsOnItsOwn_NotStoppedByRequestWithErrno()
    {
        var (device, control) = Create();
        control.Errors[NbdConstants.NBD_DO_IT] = Errno.ETIMEDOUT;
        var loop = device.StartServiceLoop("custom");
        await WaitUntil(() => control.HasCall(NbdConstants.NBD_DO_IT));
        device.ClearSocket(); // the fake's stand-in for "the connection died"
        var result = await loop.Completion.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(new NbdServiceLoopResult(false, Errno.ETIMEDOUT, "ETIMEDOUT"), result);
        Assert.Equal("custom", control.DoItThreadName);
    }

    [Fact]
    public async Task Dispose_WhileLoopRuns_StopsLoopAndLaterStopIsHarmless()
    {
        var (device, control) = Create();
        var loop = device.StartServiceLoop();
        await WaitUntil(() => control.HasCall(NbdConstants.NBD_DO_IT));
        device.Dispose();
        var result = await loop.Completion.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.True(result.StoppedByRequest);
        Assert.True(control.HasCall(NbdConstants.NBD_CLEAR_SOCK));
        control.ThrowDisposedAfterDispose = true;
        loop.Stop();
    }

    [Fact]
    public void Dispose_ClosesControl_LaterCallsThrow()
    {
        var (device, control) = Create();
        device.Dispose();
        Assert.True(control.Disposed);
        Assert.Throws<ObjectDisposedException>(() => device.SetFlags(0));
    }

    private static async Task WaitUntil(Func<bool> condition)
    {
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (true)
        {
            bool met = condition();
            if (met)
            {
                return;
            }
            Assert.True(DateTime.UtcNow < deadline, "condition not met within 10 s");
            await Task.Delay(10);
        }
    }
}

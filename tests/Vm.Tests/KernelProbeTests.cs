using System.Globalization;

namespace Vm.Tests;

/// <summary>
/// src/Nbd.Kernel on the real nbd driver: the RESULT lines of tests/Nbd.Kernel.Probe, run once in the VM
/// (exports: "probe" 64 MiB, "odd" 10 MiB + 1000 bytes, one nbd-server).
/// </summary>
[Collection(VmCollection.Name)]
public sealed class KernelProbeTests(VmFixture vm, KernelProbeFixture probe) : IClassFixture<KernelProbeFixture>
{
    private const long Probe64MiB = 64L << 20;

    private Task<VmRun> Run() => probe.RunAsync(vm);

    private static string Inv(long value) => value.ToString(CultureInfo.InvariantCulture);

    [Theory]
    [InlineData(512)]
    [InlineData(1024)]
    [InlineData(4096)]
    public async Task Ioctl_SetBlockSizeAndSizeBytes_SysfsShowsSizeRoundedDownAndBlockSize(int blockSize)
    {
        var run = await Run();
        var r = run.One("probe-geometry", ("call", "bytes"), ("bs", Inv(blockSize)), ("export", "odd"));
        Expect.Equal(run, r, "export_bytes", (10L << 20) + 1000);
        long expected = r.Long("export_bytes") / blockSize * blockSize;
        Expect.Equal(run, r, "size_set", expected);
        Expect.Equal(run, r, "sysfs_size", expected);
        Expect.Equal(run, r, "sysfs_lbs", blockSize);
        Expect.That(run, r, r.Long("connect_ms") >= 0, "the device never showed as connected");
    }

    [Fact]
    public async Task Ioctl_SetSizeBlocks_SysfsSizeIsBlocksTimesBlockSize()
    {
        var run = await Run();
        var r = run.One("probe-geometry", ("call", "blocks"), ("bs", "4096"), ("export", "probe"));
        Expect.Equal(run, r, "blocks_set", (Probe64MiB / 4096) - 3);
        Expect.Equal(run, r, "sysfs_size", r.Long("blocks_set") * 4096);
        Expect.Equal(run, r, "sysfs_lbs", 4096);
    }

    [Theory]
    [InlineData("bytes", 512, "odd")]
    [InlineData("bytes", 1024, "odd")]
    [InlineData("bytes", 4096, "odd")]
    [InlineData("blocks", 4096, "probe")]
    public async Task Ioctl_SetTimeout_QueueIoTimeoutIsThatManySeconds(string call, int blockSize, string export)
    {
        var run = await Run();
        var r = run.One("probe-geometry", ("call", call), ("bs", Inv(blockSize)), ("export", export));
        Expect.Equal(run, r, "io_timeout_ms", r.Long("timeout_s") * 1000);
        Expect.Equal(run, r, "errno", "0");
        Expect.That(run, r, r.Long("free_ms") >= 0, "the device was not freed after Stop() + Dispose()");
    }

    [Fact]
    public async Task Ioctl_SetSocketAndServiceLoop_SysfsSizeAndIoRoundTrip()
    {
        var run = await Run();
        var r = run.One("probe-ioctl-session");
        Expect.That(run, r, r.Long("connect_ms") >= 0, "the device never showed as connected");
        Expect.Equal(run, r, "size_set", Probe64MiB); // 64 MiB + 1000 rounded down to 4096
        Expect.Equal(run, r, "sysfs_size", Probe64MiB);
        Expect.Equal(run, r, "sysfs_lbs", 4096);
        Expect.Equal(run, r, "backing", "match");
    }

    [Fact]
    public async Task SetSocket_DatagramOrUnconnectedSocket_RefusedBeforeTheKernelAndDeviceStaysUsable()
    {
        var run = await Run();
        var r = run.One("probe-non-stream-socket");
        Expect.Equal(run, r, "udp_set_socket", "ArgumentException:stream");
        Expect.Equal(run, r, "udp_set_sockets", "ArgumentException:stream");
        Expect.Equal(run, r, "unconnected_tcp", "ArgumentException:connected");
        Expect.Equal(run, r, "sysfs_size_after", 0);
        Expect.Equal(run, r, "pid_after", "absent");
        Expect.That(run, r, r.Long("connect_ms") >= 0, "a proper socket on the same descriptor did not connect");
        Expect.Equal(run, r, "backing", "match");
        Expect.That(run, r, !run.Output.Contains("Unsupported socket", StringComparison.Ordinal), "the kernel logged an unsupported socket");
    }

    [Fact]
    public async Task StartServiceLoop_DedicatedNamedThread_StopReturnsWithin2sAndFreesTheDevice()
    {
        var run = await Run();
        var r = run.One("probe-ioctl-session");
        Expect.Equal(run, r, "pid_is_process", "False");
        Expect.Equal(run, r, "pid_is_our_thread", "True");
        Expect.Equal(run, r, "loop_thread_name", "nbd0_DO_IT"); // "nbd0 DO_IT"; the probe writes spaces as _
        Expect.That(run, r, r.Long("stop_ms") is >= 0 and <= 2000, $"NBD_DO_IT returned {r["stop_ms"]} ms after Stop() (limit 2000)");
        Expect.Equal(run, r, "stopped_by_request", "True");
        Expect.Equal(run, r, "errno", "0");
        Expect.That(run, r, r.Long("free_ms") >= 0, "the device was not freed after Dispose()");
    }

    [Fact]
    public async Task ServiceLoop_AfterStop_DeviceReusableWithANewSocket()
    {
        var run = await Run();
        var r = run.One("probe-ioctl-reuse");
        Expect.That(run, r, r.Long("connect_ms") >= 0, "nbd0 did not connect again after the first session");
        Expect.Equal(run, r, "sysfs_lbs", 1024);
        Expect.Equal(run, r, "backing", "match");
        Expect.Equal(run, r, "stopped_by_request", "True");
        Expect.That(run, r, r.Long("free_ms") >= 0, "the device was not freed after the second session");
    }

    [Fact]
    public async Task Disconnect_ConnectedDevice_LoopReturnsAndDeviceFreed()
    {
        var run = await Run();
        var r = run.One("probe-ioctl-disconnect");
        Expect.That(run, r, r.Long("connect_ms") >= 0, "nbd0 did not connect");
        Expect.Equal(run, r, "stopped_by_request", "True");
        Expect.Equal(run, r, "errno", "0");
        Expect.That(run, r, r.Long("free_ms") >= 0, "the device was not freed after Disconnect() + Dispose()");
        Expect.Equal(run, r, "size_after", 0);
        Expect.Equal(run, r, "pid_after", "absent");
    }

    [Fact]
    public async Task ClearQueue_BeforeAndWhileConnected_SucceedsAndIoStillWorks()
    {
        var run = await Run();
        var r = run.One("probe-ioctl-session");
        Expect.Equal(run, r, "clear_que", "ok");
        Expect.Equal(run, r, "clear_que_connected", "ok");
        Expect.Equal(run, r, "backing", "match"); // written after the second NBD_CLEAR_QUE
    }

    [Fact]
    public async Task OpenUnused_Nbd0Busy_PicksAnotherFreeDevice()
    {
        var run = await Run();
        var r = run.One("probe-open-unused");
        Expect.That(run, r, r.Long("nbd0_connect_ms") >= 0, "nbd0 did not connect, so it was not busy");
        Expect.That(run, r, r["path"].StartsWith("/dev/nbd", StringComparison.Ordinal) && r["path"] != "/dev/nbd0", $"picked {r["path"]}");
        Expect.Equal(run, r, "picked_size", 0);
        Expect.That(run, r, r.Long("free_ms") >= 0, "nbd0 was not freed afterwards");
    }

    /// <summary>
    /// What a relay that survives its own crash would stand on: the peek offset of each end of the driver's socket pair
    /// counts exactly the bytes consumed from it, our end's by the relay's reads, the driver's end's by the driver's own
    /// reads of our replies. A counter that drifted from either count would put a resumed relay in the wrong place.
    /// </summary>
    [Fact]
    public async Task PeekOffset_BothEndsOfTheDriversPair_CountExactlyTheBytesConsumed()
    {
        var run = await Run();
        var r = run.One("probe-peek-offset-counters");
        Expect.That(run, r, r.Long("connect_ms") >= 0, "the device never showed as connected");
        Expect.Equal(run, r, "read_back", "match");
        Expect.That(run, r, r.Long("requests") >= 10, "the driver sent hardly any request");
        Expect.That(run, r, r.Long("consumed") > 3L << 20, "the write data never reached the server side");
        Expect.Equal(run, r, "our_counter", r.Long("consumed"));
        Expect.Equal(run, r, "kernel_end_unread", 0);
        Expect.That(run, r, r.Long("replied") > 4L << 20, "the read data never went back to the driver");
        Expect.Equal(run, r, "kernel_counter", r.Long("replied"));

        // The capacity a relay keeping requests unread in the socket would have (Transmission/README.md): the driver's
        // largest request by default.
        Expect.Equal(run, r, "max_sectors_kb", 128);
        Expect.Equal(run, r, "errno", "0");
        Expect.That(run, r, r.Long("free_ms") >= 0, "the device was not freed");
    }

    [Fact]
    public async Task ServiceLoop_WithoutSocket_Einval()
    {
        var run = await Run();
        var r = run.One("probe-ioctl-no-socket");
        Expect.Equal(run, r, "errno", "EINVAL");
    }

    [Fact]
    public async Task ServiceLoop_ServerSocketDies_ReturnsNotByRequestAndDeviceFreed()
    {
        var run = await Run();
        var r = run.One("probe-ioctl-socket-death");
        Expect.Equal(run, r, "stopped_by_request", "False");
        Expect.That(run, r, r.Long("return_ms") is >= 0 and <= 5000, $"NBD_DO_IT returned {r["return_ms"]} ms after the socket died");
        Expect.That(run, r, r.Long("free_ms") >= 0, "the device was not freed");
    }

    [Fact]
    public async Task Netlink_ConnectAndStatus_SysfsAndIo()
    {
        var run = await Run();
        var r = run.One("probe-netlink");
        Expect.That(run, r, r.Long("family_id") > 0, "no generic netlink family id for nbd");
        Expect.Equal(run, r, "status_devices", 16); // insmod nbd.ko nbds_max=16
        Expect.Equal(run, r, "status_connected", 0);
        var index = r.Long("index");
        Expect.That(run, r, index is >= 0 and < 16, $"index {r["index"]}");
        Expect.Equal(run, r, "sysfs_connected", "True");
        Expect.Equal(run, r, "sysfs_backend", "probe-nl");
        Expect.Equal(run, r, "sysfs_lbs", 4096);
        Expect.Equal(run, r, "sysfs_size", Probe64MiB);
        Expect.Equal(run, r, "status_one", $"{index}:True");
        Expect.Equal(run, r, "backing1", "match");
        Expect.Equal(run, r, "connect_same_index", "EBUSY");
    }

    [Fact]
    public async Task Netlink_SocketDies_LinkDeadArrivesAndReconfigureWithSameBackendRevivesDevice()
    {
        var run = await Run();
        var r = run.One("probe-netlink");
        Expect.Equal(run, r, "link_dead_index", r["index"]);
        Expect.That(run, r, r.Long("link_dead_ms") is >= 0 and <= 5000, $"LINK_DEAD after {r["link_dead_ms"]} ms");
        Expect.Equal(run, r, "reconfigure_without_backend", "EINVAL");
        Expect.Equal(run, r, "reconfigure", "ok");
        Expect.Equal(run, r, "sysfs_connected_after_reconfigure", "True");
        Expect.Equal(run, r, "backing2", "match");
        Expect.Equal(run, r, "readback2", "match"); // written to the backing file, read through the revived device
        Expect.Equal(run, r, "reconfigure_unknown_index", "EINVAL");
    }

    [Fact]
    public async Task Netlink_Disconnect_DeviceFreedAndStatusDisconnected()
    {
        var run = await Run();
        var r = run.One("probe-netlink");
        Expect.That(run, r, r.Long("free_ms") >= 0, "the device was not freed after netlink Disconnect");
        Expect.Equal(run, r, "status_after", $"{r["index"]}:False");
        Expect.Equal(run, r, "disconnect_again", "ok");
    }

    [Fact]
    public async Task Netlink_DestroyOnDisconnect_NewIndexCreatedThenRemoved()
    {
        var run = await Run();
        var r = run.One("probe-netlink-destroy");
        Expect.Equal(run, r, "index", 20);
        Expect.Equal(run, r, "created", "True");
        Expect.Equal(run, r, "listed", "True");
        Expect.Equal(run, r, "removed", "True");
    }

    [Fact]
    public async Task Probe_RanToTheEnd_NoStepFailed()
    {
        var run = await Run();
        Assert.True(run.Completed, $"the probe VM did not reach its end marker (run-vm.sh exit {run.ExitCode}).\n{run.Tail()}");
        var failed = run.Results.Where(r => r.Scenario.StartsWith("probe", StringComparison.Ordinal) && r.Values.ContainsKey("error")).ToList();
        Assert.True(failed.Count == 0, "probe steps threw:\n" + string.Join('\n', failed.Select(f => f.Raw)));
        Assert.Equal(0, run.ExitCode);
    }
}

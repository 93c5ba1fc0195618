using Xunit.Abstractions;

namespace Vm.Tests;

/// <summary>The VM run of tests/vm/scenarios/daemon-service.sh: the daemon (no verb) with configured mappings.</summary>
internal static class DaemonServiceScenario
{
    public static readonly ScenarioSpec Spec = new("daemon-service.sh", ["nbd-server", "nbdkit", "qemu-nbd"], true, 900);

    /// <summary>Every mapping runs with Reconnect:InitialDelay=1 s and MaxDelay=2 s.</summary>
    public const long MaxDelayMs = 2000;

    /// <summary>
    /// TCG on a shared 2-core host: a connect + handshake + kernel configuration took 0.1–1.5 s in the runs seen,
    /// and the shell's polling adds up to 50 ms. Bounds below are the configured delay plus this.
    /// </summary>
    public const long TcgSlackMs = 4000;

    public const long ExportBytes = 20L << 20;
}

/// <summary>
/// The daemon as a service on the real driver: three mappings (nbd-server, nbdkit file, qemu-nbd) on nbd0..2 for
/// ioctl (command-line configuration) and netlink (/etc/nbd-daemon/appsettings.json); a server down at start;
/// a server SIGKILLed and restarted; SIGTERM; bad configurations (exit 78).
/// </summary>
[Collection(VmCollection.Name)]
public sealed class DaemonServiceTests(VmFixture vm, ITestOutputHelper output)
{
    [Fact]
    public async Task Scenario_VmTools_AllPresent()
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("tools");
        foreach (var tool in new[] { "nbd_server", "nbdkit", "qemu_nbd", "daemon" })
        {
            Expect.Equal(run, r, tool, "yes");
        }
    }

    [Theory]
    [InlineData("Ioctl")]
    [InlineData("Netlink")]
    public async Task Start_OneServerDown_OthersConnectAndItConnectsWithinBackoffOnceUp(string mode)
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("late", ("mode", mode));
        output.WriteLine(r.Raw);
        Expect.Equal(run, r, "nbd0_connected", "yes");
        Expect.Equal(run, r, "nbd1_connected", "yes");
        // 3 s after the others connected, the mapping whose server is down has not taken its device, and the
        // daemon keeps running (a failing mapping is not a reason to exit).
        Expect.Equal(run, r, "nbd2_before_server", "free");
        Expect.Equal(run, r, "daemon_alive", "yes");
        Expect.Equal(run, r, "nbd2_connected", "yes");
        long late = r.Long("nbd2_after_server_ms");
        Expect.That(run, r, late <= DaemonServiceScenario.MaxDelayMs + DaemonServiceScenario.TcgSlackMs,
            $"connected {late} ms after its server started; the backoff is capped at {DaemonServiceScenario.MaxDelayMs} ms");
    }

    [Theory]
    [InlineData("Ioctl", "nbd-server")]
    [InlineData("Ioctl", "nbdkit")]
    [InlineData("Ioctl", "qemu-nbd")]
    [InlineData("Netlink", "nbd-server")]
    [InlineData("Netlink", "nbdkit")]
    [InlineData("Netlink", "qemu-nbd")]
    public async Task Serve_ConfiguredMapping_4MiBDirectRoundTripReachesBackingFile(string mode, string server)
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("data", ("mode", mode), ("server", server));
        output.WriteLine(r.Raw);
        Expect.Equal(run, r, "size", DaemonServiceScenario.ExportBytes);
        Expect.Equal(run, r, "pid", "present");
        Expect.Equal(run, r, "write_rc", 0);
        Expect.Equal(run, r, "read_rc", 0);
        Expect.Equal(run, r, "readback", "match");
        Expect.Equal(run, r, "backing", "match");
    }

    [Theory]
    [InlineData("Ioctl")]
    [InlineData("Netlink")]
    public async Task Outage_ServerKilledAndRestarted_MappingServesAgainAndOthersNeverFail(string mode)
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("outage", ("mode", mode));
        output.WriteLine(r.Raw);
        Expect.Equal(run, r, "daemon_alive", "yes");
        Expect.Equal(run, r, "recovered", "yes");
        long recover = r.Long("recover_after_restart_ms");
        Expect.That(run, r, recover <= DaemonServiceScenario.MaxDelayMs + DaemonServiceScenario.TcgSlackMs,
            $"new I/O succeeded {recover} ms after the server restarted; the backoff is capped at {DaemonServiceScenario.MaxDelayMs} ms");
        // New I/O after the reconnect: the same size, data round trip and the backing file.
        Expect.Equal(run, r, "size", DaemonServiceScenario.ExportBytes);
        Expect.Equal(run, r, "write_rc", 0);
        Expect.Equal(run, r, "read_rc", 0);
        Expect.Equal(run, r, "readback", "match");
        Expect.Equal(run, r, "backing", "match");
        // The two other mappings served throughout: I/O ran, none failed, their devices never changed hands.
        Expect.That(run, r, r.Long("others_ops") >= 10, "the other devices' I/O loop hardly ran");
        Expect.Equal(run, r, "others_fails", 0);
        Expect.Equal(run, r, "others_pids_kept", "yes");
        Expect.That(run, r, r.Long("reconnecting_lines") >= 1, "the daemon never logged Reconnecting for the killed server");
        Expect.That(run, r, r.Long("victim_ops") >= 1, "nothing read the killed server's device during the outage");
    }

    /// <summary>
    /// Netlink with DeadConnectionTimeout=30 s: the kernel holds the I/O of a dead link until RECONFIGURE, so an
    /// application reading through the outage sees no error. (Ioctl has no such hold; what it saw is reported by
    /// the outage test's output, not asserted.)
    /// </summary>
    [Fact]
    public async Task Outage_NetlinkWithDeadConnectionTimeout_ReaderOnKilledDeviceSeesNoError()
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("outage", ("mode", "Netlink"));
        output.WriteLine(r.Raw);
        Expect.That(run, r, r.Long("victim_ops") >= 1, "nothing read the killed server's device during the outage");
        Expect.Equal(run, r, "victim_fails", 0);
    }

    [Theory]
    [InlineData("Ioctl")]
    [InlineData("Netlink")]
    public async Task Stop_Sigterm_ExitsZeroWithin5sAndFreesEveryDevice(string mode)
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("stop", ("mode", mode));
        output.WriteLine(r.Raw);
        Expect.Equal(run, r, "exit_rc", 0);
        Expect.That(run, r, r.Long("exit_ms") <= 5000, $"exit took {r["exit_ms"]} ms after SIGTERM");
        Expect.Equal(run, r, "nbd0_freed", "yes");
        Expect.Equal(run, r, "nbd1_freed", "yes");
        Expect.Equal(run, r, "nbd2_freed", "yes");
        Expect.Equal(run, r, "sizes", "0,0,0");
        // One NBD_DISCONNECT per device: a second one failed against the closed connection, a kernel error line per
        // device at every stop (3 with the build before).
        Expect.Equal(run, r, "disconnect_failed_lines", 0);
    }

    /// <summary>
    /// A valid Ioctl mapping naming the device `nbd-daemon connect` holds: every attempt is refused from sysfs before a
    /// single ioctl, so the other client's device keeps its connection, size and data (before: SET_BLKSIZE/SIZE went
    /// through, SET_SOCK failed, and the cleanup's NBD_CLEAR_SOCK ended that connection).
    /// </summary>
    [Fact]
    public async Task Start_IoctlMappingOnDeviceAnotherClientHolds_RefusedAndThatDeviceUntouched()
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        Expect.Equal(run, run.One("pre"), "connected", "yes");
        var r = run.One("busydevice_valid");
        output.WriteLine(r.Raw);
        Expect.That(run, r, r.Long("refusals") >= 2, "the mapping did not report the device in use at two attempts");
        Expect.Equal(run, r, "exit_rc", 0);
        ExpectConnectMappingUntouched(run, r);
    }

    /// <summary>
    /// `nbd-daemon connect URI /dev/nbd5 --block-size 512 --read-only` on the device another `connect` holds: exit 1
    /// saying it is in use, and nbd5 keeps its thread, size, block size, writability and data (SET_BLKSIZE, SET_SIZE and
    /// SET_FLAGS have no owner check: before, they went through and only SET_SOCK failed).
    /// </summary>
    [Fact]
    public async Task Connect_DeviceAnotherClientHolds_Exit1AndThatDeviceUntouched()
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("busydevice_connect");
        output.WriteLine(r.Raw);
        Expect.Equal(run, r, "exit_rc", 1);
        Expect.Equal(run, r, "said_in_use", "yes");
        ExpectConnectMappingUntouched(run, r);
        Expect.Equal(run, r, "pre_ro", 0);
        Expect.Equal(run, r, "lbs_kept", "yes");
    }

    [Theory]
    [InlineData("interface")]   // Interface=Bogus next to a valid mapping, on the command line
    [InlineData("duplicate")]   // the same Device twice, through environment variables
    [InlineData("busydevice")]  // Interface=Bogus next to a mapping naming the device `connect` already holds
    public async Task Start_BadConfiguration_Exits78NamingKeyAndTouchesNoDevice(string badCase)
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var pre = run.One("pre");
        Expect.Equal(run, pre, "connected", "yes");
        var r = run.One("badconfig", ("case", badCase));
        output.WriteLine(r.Raw);
        Expect.Equal(run, r, "exit_rc", 78);
        Expect.Equal(run, r, "key_named", "yes");
        Expect.Equal(run, r, "touched", "none");
        ExpectConnectMappingUntouched(run, r);
    }

    /// <summary>The mapping `nbd-daemon connect` made on nbd5 beforehand: same thread id, same size, still reads.</summary>
    private static void ExpectConnectMappingUntouched(VmRun run, ResultLine r)
    {
        Expect.Equal(run, r, "pre_pid_kept", "yes");
        Expect.Equal(run, r, "pre_size", DaemonServiceScenario.ExportBytes);
        Expect.Equal(run, r, "pre_read", "ok");
    }

    /// <summary>
    /// An Ioctl device held open (as by a mounted filesystem) while its server restarts: the driver keeps the old
    /// configuration until the last close, so every attempt is refused before NBD_SET_SOCK (before: SET_SOCK succeeded,
    /// NBD_DO_IT failed EBUSY unseen, and each 1 s retry left one more kernel-held connection to the server); once the
    /// holder closes it, the mapping serves again.
    /// </summary>
    [Fact]
    public async Task Outage_IoctlDeviceHeldOpen_NoConnectionPerRetryAndServesOnceClosed()
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("held");
        output.WriteLine(r.Raw);
        Expect.Equal(run, r, "connected", "yes");
        // A repeated reason is logged at attempts 1, 2, 4, 8, …: two lines at least in the 8 s (the first is a new reason).
        Expect.That(run, r, r.Long("refusals") >= 2, "the mapping did not refuse the held device at two logged attempts");
        Expect.That(run, r, r.Long("established") <= 1, $"{r.Long("established")} connections to the server left established by the retries");
        Expect.Equal(run, r, "served_after_close", "yes");
        Expect.Equal(run, r, "read", "ok");
        Expect.Equal(run, r, "exit_rc", 0);
    }

    /// <summary>
    /// Two mappings without Device next to two that name nbd0 and nbd2 and have no server (those devices look free, as
    /// at a boot with the server down): neither takes a named device, nor the same one (before: the Ioctl one took nbd0,
    /// the first free device, and an fstab entry for nbd0 would have mounted its export).
    /// </summary>
    [Fact]
    public async Task Start_MappingsWithoutDevice_NeverTakeADeviceAnotherMappingNames()
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("claims");
        output.WriteLine(r.Raw);
        string io = r["any_io"], nl = r["any_nl"];
        Expect.That(run, r, io.StartsWith("/dev/nbd", StringComparison.Ordinal) && nl.StartsWith("/dev/nbd", StringComparison.Ordinal), "a mapping without Device did not get a device");
        Expect.That(run, r, io is not ("/dev/nbd0" or "/dev/nbd2") && nl is not ("/dev/nbd0" or "/dev/nbd2"), "a mapping without Device took a device another mapping names");
        Expect.That(run, r, io != nl, "both mappings without Device got the same device");
        string[] connected = [.. r["connected"].Split(',', StringSplitOptions.RemoveEmptyEntries).Order()];
        Expect.That(run, r, connected.SequenceEqual(new[] { io[5..], nl[5..] }.Order()), $"connected devices {r["connected"]}, expected exactly {io} and {nl}");
        Expect.Equal(run, r, "exit_rc", 0);
    }

    /// <summary>
    /// SIGTERM while the server has stopped reading (SIGSTOP) under write load: the driver's NBD_CMD_DISC waits behind a
    /// request send blocked on the full socket (up to Timeout, 30 s, and again for its own send); the disconnect shuts
    /// the socket down after 5 s, so the stop ends well within the host's 20 s and the device is freed (measured: the
    /// build before took 20.2 s and ended on the host's shutdown timeout; this one 5.6 s).
    /// </summary>
    [Fact]
    public async Task Stop_ServerStoppedReadingUnderWriteLoad_ExitsPromptlyAndFreesTheDevice()
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("stallstop");
        output.WriteLine(r.Raw);
        Expect.Equal(run, r, "connected", "yes");
        Expect.That(run, r, r.Long("send_queue") > 0, "the kernel's socket had nothing queued: the server's stall was not felt");
        Expect.Equal(run, r, "exit_rc", 0);
        Expect.That(run, r, r.Long("exit_ms") < 15000, $"the stop took {r.Long("exit_ms")} ms");
        Expect.Equal(run, r, "freed", "yes");
    }

    /// <summary>
    /// The same Netlink mapping in a second daemon started by hand beside the one running it (an admin trying the
    /// configuration while the service runs): the second touches neither server nor device and names the first one's
    /// pid; its Ctrl-C leaves the first one's device connected and serving. Before the mapping lock, the second adopted
    /// the device by its backend identifier and its stop disconnected it.
    /// </summary>
    [Fact]
    public async Task Start_SameMappingInASecondProcess_RefusedAndItsStopLeavesTheDeviceServing()
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("twin");
        output.WriteLine(r.Raw);
        Expect.Equal(run, r, "connected", "yes");
        Expect.That(run, r, r.Long("refusals") >= 2, "the second process did not refuse the mapping at two logged attempts");
        Expect.Equal(run, r, "holder", r["first_pid"]);
        Expect.That(run, r, r.Long("conns_during") == r.Long("conns_before"), $"{r.Long("conns_during")} server connections while the second process ran, {r.Long("conns_before")} before: it connected");
        Expect.Equal(run, r, "second_rc", 0);
        Expect.Equal(run, r, "connected_after", "yes");
        Expect.Equal(run, r, "backend", "nbd-daemon:twin");
        Expect.Equal(run, r, "read", "ok");
        Expect.Equal(run, r, "first_lost", 0);
        Expect.Equal(run, r, "exit_rc", 0);
    }

    /// <summary>
    /// A Netlink mapping without Device next to one naming nbd0 (so the daemon chooses the device, not the kernel), with
    /// nbd1 open in another process without a configuration: sysfs shows nbd1 free, NBD_CMD_CONNECT to it fails EBUSY.
    /// The next attempt takes another device (before: nbd1 again at every attempt, for as long as it stayed open).
    /// </summary>
    [Fact]
    public async Task Start_NetlinkDeviceItWouldPickIsOpenElsewhere_TakesAnother()
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("busypick");
        output.WriteLine(r.Raw);
        Expect.That(run, r, r.Long("busy_refusals") >= 1, "CONNECT to the open nbd1 was never refused: the case was not exercised");
        Expect.That(run, r, r["device"] is not ("none" or "/dev/nbd0" or "/dev/nbd1"), $"the mapping ended on {r["device"]}");
        Expect.Equal(run, r, "read", "ok");
        Expect.Equal(run, r, "exit_rc", 0);
    }

    /// <summary>
    /// A server that takes at most 64 KiB per request (NBD_INFO_BLOCK_SIZE, enforced by nbdkit's blocksize-policy
    /// filter), half the driver's own 128 KiB: the daemon lowers the device's queue/max_sectors_kb before the kernel has
    /// a socket (Ioctl) or right after CONNECT (Netlink), and 1 MiB direct writes and reads work. Before, the driver's
    /// 128 KiB requests were refused: I/O errors.
    /// </summary>
    [Theory]
    [InlineData("nbd6")]
    [InlineData("nbd7")]
    public async Task Start_ServerMaximumRequestBelowTheDrivers_RequestsCappedAndLargeIoWorks(string device)
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("maxreq", ("device", device));
        output.WriteLine(r.Raw);
        Expect.That(run, r, r.Long("before_kb") > 64, $"the device's limit was {r["before_kb"]} KiB already: the case was not exercised");
        Expect.Equal(run, r, "max_sectors_kb", 64);
        Expect.Equal(run, r, "said_capped", "yes");
        Expect.Equal(run, r, "write_rc", 0);
        Expect.Equal(run, r, "read_rc", 0);
        Expect.Equal(run, r, "readback", "yes");
        var kernel = run.One("maxreq_kernel");
        Expect.Equal(run, kernel, "marker", 1); // the step's kernel lines were found at all
        Expect.Equal(run, kernel, "io_errors", 0);
    }

    /// <summary>Stopped (OnStop=Disconnect), both devices get back the limit they had before the mapping lowered it.</summary>
    [Fact]
    public async Task Stop_ServerMaximumRequest_DevicesGetTheirLimitBack()
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("maxreq_after_stop");
        output.WriteLine(r.Raw);
        Expect.That(run, r, r.Long("before6_kb") > 64 && r.Long("before7_kb") > 64, "the devices' limits were 64 KiB already: the case was not exercised");
        Expect.Equal(run, r, "nbd6_kb", r.Long("before6_kb"));
        Expect.Equal(run, r, "nbd7_kb", r.Long("before7_kb"));
        Expect.Equal(run, r, "said_restored", 2);
    }

    [Fact]
    public async Task Connect_AfterBadConfigurations_StillStopsCleanly()
    {
        var run = await vm.RunAsync(DaemonServiceScenario.Spec);
        var r = run.One("pre_stop");
        Expect.Equal(run, r, "exit_rc", 0);
        Expect.Equal(run, r, "freed", "yes");
    }
}

namespace Vm.Tests;

/// <summary>Scenarios 2-4: geometry, read-only, check/disconnect, automatic device choice, stop by signal, signals to the NBD_DO_IT thread.</summary>
[Collection(VmCollection.Name)]
public sealed class DaemonDeviceTests(VmFixture vm)
{
    public static TheoryData<string, int, string> Geometries()
    {
        var data = new TheoryData<string, int, string>();
        foreach (var mode in new[] { "ioctl", "netlink" })
        {
            foreach (var bs in new[] { 512, 1024, 4096 })
            {
                foreach (var export in new[] { "even", "odd" })
                {
                    data.Add(mode, bs, export);
                }
            }
        }

        return data;
    }

    /// <summary>
    /// The kernel sets the capacity from the byte size it is given (nbd_set_size: bytesize &gt;&gt; 9), so a size
    /// that is not a multiple of the block size is the daemon's to round down; a partial last block cannot be addressed.
    /// </summary>
    [Theory]
    [MemberData(nameof(Geometries))]
    public async Task Connect_BlockSize_SysfsSizeAndLogicalBlockSizeMatchNegotiated(string mode, int blockSize, string export)
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonDevice);
        var r = run.One("geometry", ("mode", mode), ("bs", blockSize.ToString(System.Globalization.CultureInfo.InvariantCulture)), ("export", export));
        Expect.Equal(run, r, "connected", "yes");
        Expect.Equal(run, r, "lbs", blockSize);
        Expect.Equal(run, r, "size", r.Long("export_bytes") / blockSize * blockSize);
    }

    [Theory]
    [InlineData("ioctl")]
    [InlineData("netlink")]
    public async Task Connect_ReadOnly_WritesRefusedReadsWork(string mode)
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonDevice);
        var r = run.One("readonly", ("mode", mode));
        Expect.Equal(run, r, "connected", "yes");
        Expect.Equal(run, r, "sysfs_ro", 1);
        Expect.That(run, r, r["write_rc"] != "0", "a write to a read-only mapping succeeded");
        Expect.That(run, r, r["write_error"] is "EPERM" or "EROFS", $"write error: expected EPERM or EROFS, got {r["write_error"]}");
        Expect.Equal(run, r, "read_rc", 0);
    }

    [Theory]
    [InlineData("ioctl")]
    [InlineData("netlink")]
    public async Task CheckAndDisconnect_ConnectedDevice_ExitCodesAndDeviceFreed(string mode)
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonDevice);
        var r = run.One("readonly", ("mode", mode));
        Expect.Equal(run, r, "connected", "yes");
        Expect.Equal(run, r, "check_connected_rc", 0);
        Expect.Equal(run, r, "disconnect_rc", 0);
        Expect.Equal(run, r, "freed", "yes");
        Expect.Equal(run, r, "size_after", 0);
        Expect.Equal(run, r, "pid_after", "absent");
        Expect.Equal(run, r, "check_after_rc", 1);
        Expect.Equal(run, r, "check_unused_rc", 1);
    }

    /// <summary>
    /// `disconnect` from another process: the foreground `connect` must notice on its own and leave with 0. Over
    /// netlink it learns it from its socket's end (NbdSocketWatch) and then sysfs, not from a signal.
    /// </summary>
    [Fact]
    public async Task DisconnectElsewhere_Netlink_ConnectExits0SayingSoWithin5s()
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonDevice);
        var r = run.One("readonly", ("mode", "netlink"));
        Expect.Equal(run, r, "connected", "yes");
        Expect.Equal(run, r, "disconnect_rc", 0);
        Expect.Equal(run, r, "connect_exit_rc", 0);
        Expect.Equal(run, r, "said_elsewhere", "yes");
        Expect.That(run, r, r.Long("connect_exit_ms") <= 5000, $"connect exited {r["connect_exit_ms"]} ms after disconnect returned (limit 5000)");
    }

    [Theory]
    [InlineData("ioctl")]
    [InlineData("netlink")]
    public async Task Connect_NoDeviceWhileNbd0Busy_PicksAnotherUnusedDevice(string mode)
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonDevice);
        var r = run.One("autodev", ("mode", mode));
        Expect.Equal(run, r, "first_connected", "yes");
        Expect.That(run, r, r["picked"] is not "none" and not "nbd0", $"picked device: {r["picked"]}");
        // The odd export (10 MiB + 1000 bytes) rounded down to whatever block size was chosen: at least 10 MiB - 4 KiB.
        Expect.That(run, r, r.Long("picked_size") is > (10L << 20) - 4096 and <= (10L << 20) + 1000, $"picked device size {r["picked_size"]}");
        Expect.Equal(run, r, "nbd0_still_connected", "yes");
        Expect.Equal(run, r, "second_exit_rc", 0);
        Expect.Equal(run, r, "picked_freed", "yes");
    }

    [Theory]
    [InlineData("ioctl", "TERM")]
    [InlineData("netlink", "TERM")]
    [InlineData("ioctl", "INT")]
    [InlineData("netlink", "INT")]
    [InlineData("ioctl", "HUP")]
    [InlineData("netlink", "HUP")]
    public async Task Connect_Signal_DeviceFreedWithin2sAndExitCode0(string mode, string signal)
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonDevice);
        var r = run.One("stop", ("mode", mode), ("signal", signal));
        Expect.Equal(run, r, "connected", "yes");
        // The scenario starts connect as a terminal would (SIGINT at its default); an inherited SIG_IGN would make
        // the SIGINT case test nothing.
        Expect.Equal(run, r, "sigint_ignored", "no");
        Expect.Equal(run, r, "freed", "yes");
        Expect.That(run, r, r.Long("free_ms") <= 2000, $"device freed after {r["free_ms"]} ms (limit 2000)");
        Expect.Equal(run, r, "exit_rc", 0);
        Expect.Equal(run, r, "size_after", 0);
        Expect.Equal(run, r, "pid_after", "absent");
    }

    /// <summary>
    /// Standard output refuses the "connected" line (/dev/full): the command fails with a message that says so, and
    /// leaves no device configured that nobody serves (the netlink path used to exit with the device still connected).
    /// </summary>
    [Theory]
    [InlineData("ioctl")]
    [InlineData("netlink")]
    public async Task Connect_StandardOutputFull_FailsAndLeavesNothingConfigured(string mode)
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonDevice);
        var r = run.One("fullout", ("mode", mode));
        Expect.Equal(run, r, "exit_rc", 1);
        Expect.Equal(run, r, "said_stdout", "yes");
        Expect.Equal(run, r, "freed", "yes");
        Expect.Equal(run, r, "size_after", 0);
        Expect.Equal(run, r, "pid_after", "absent");
    }

    /// <summary>
    /// The server SIGKILLed under a `connect`: the command ends and the device is free again for the next `connect`. A
    /// netlink device whose connection died stays configured in the kernel (every request failing) until someone
    /// disconnects it; the command used to wait for that for ever. LINK_DEAD tells it the connection was lost: exit 1.
    /// The ioctl NBD_DO_IT returns 0 for a lost connection as for a disconnect from elsewhere, so that path cannot tell
    /// the two apart: exit 0, and its message names both.
    /// </summary>
    [Theory]
    [InlineData("ioctl", 0)]
    [InlineData("netlink", 1)]
    public async Task Connect_ServerKilled_EndsAndFreesTheDevice(string mode, int exitCode)
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonDevice);
        var r = run.One("lost", ("mode", mode));
        Expect.Equal(run, r, "connected", "yes");
        Expect.Equal(run, r, "exit_rc", exitCode);
        Expect.That(run, r, r.Long("exit_ms") <= 10000, $"connect ended {r["exit_ms"]} ms after the server was killed (limit 10000)");
        Expect.Equal(run, r, "said_lost", "yes");
        Expect.Equal(run, r, "freed", "yes");
        Expect.Equal(run, r, "size_after", 0);
        Expect.Equal(run, r, "pid_after", "absent");
        // The step's own kernel lines were found; an idle device fails no I/O. Netlink's disconnect of the dead device
        // adds one "Send disconnect failed -32" (the driver sends NBD_CMD_DISC on every socket, dead ones too): in the raw line.
        Expect.Equal(run, r, "kernel_marker", 1);
        Expect.Equal(run, r, "kernel_io_errors", 0);
    }

    /// <summary>
    /// A mapped, idle `connect` must cost ~no CPU: both interfaces leave it blocked in one system call (ioctl:
    /// NBD_DO_IT; netlink: poll(2) on the socket). The sysfs polling the netlink path used to do cost seconds of CPU
    /// per minute under TCG (README "Measured figures").
    /// </summary>
    [Theory]
    [InlineData("ioctl")]
    [InlineData("netlink")]
    public async Task Connect_IdleWhileMapped_UsesAtMost1sCpuIn10s(string mode)
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonDevice);
        var r = run.One("idle", ("mode", mode));
        Expect.Equal(run, r, "connected", "yes");
        Expect.Equal(run, r, "still_connected", "yes");
        Expect.That(run, r, r["ticks_before"] != "none" && r["ticks_after"] != "none", "/proc/PID/stat was not readable");
        Expect.That(run, r, r.Long("idle_cpu_ms") <= IdleCpuLimitMs, $"idle connect used {r["idle_cpu_ms"]} ms CPU in 10 s (limit {IdleCpuLimitMs}; busiest thread {r["busiest_thread"]})");
        Expect.Equal(run, r, "exit_rc", 0);
        Expect.Equal(run, r, "freed", "yes");
    }

    private const long IdleCpuLimitMs = 1000;

    /// <summary>
    /// The driver waits in NBD_DO_IT interruptibly: a handled signal that lands on that thread makes it shut the sockets
    /// down and clear the queue (the build before: "shutting down sockets", the device freed, `connect` exit 1). A
    /// signal sent to the process can land there, and .NET handles SIGCONT, which systemd sends after SIGTERM at every
    /// stop. Here the signals go to that very thread (tgkill), so nothing else could have taken them.
    /// </summary>
    [Fact]
    public async Task Connect_Ioctl_HandledSignalsSentToTheDoItThread_DeviceKeepsServing()
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonDevice);
        var r = run.One("doitsig");
        Expect.Equal(run, r, "connected", "yes");
        Expect.That(run, r, r["doit_tid"] != "none", "no thread id in /sys/block/nbd0/pid");
        // Proves nothing unless the process handles at least one of the signals sent (SIGCONT, for .NET 10).
        Expect.That(run, r, r["caught"] != "none", "the process handles none of SIGCHLD, SIGCONT, SIGURG, SIGWINCH: the step shows nothing");
        Expect.Equal(run, r, "tgkill_rc", 0);
        Expect.Equal(run, r, "alive", "yes");
        Expect.Equal(run, r, "pid_after_signals", r["doit_tid"]);
        Expect.Equal(run, r, "read_rc", 0);
        Expect.Equal(run, r, "read_bytes", 4 * 1024 * 1024);
        Expect.Equal(run, r, "kernel_marker", 1);
        // Only the connect's own "detected capacity change" line; no "shutting down sockets", no I/O error.
        Expect.Equal(run, r, "kernel_nbd0_lines", 1);
        Expect.Equal(run, r, "exit_rc", 0);
        Expect.Equal(run, r, "freed", "yes");
    }

    /// <summary>
    /// A stop (SIGSTOP, Ctrl-Z, a debugger or <c>strace -p</c> attaching) cannot be blocked. Netlink has no thread in the
    /// kernel, so a stopped and continued `connect` changes nothing; over ioctl it interrupts NBD_DO_IT's wait, and the
    /// 6.1 driver then shuts the sockets down (a driver property: see README "Choosing an interface"). What `connect` must
    /// do then is say so and leave nothing configured.
    /// </summary>
    [Theory]
    [InlineData("netlink")]
    [InlineData("ioctl")]
    public async Task Connect_ProcessStoppedAndContinued_NetlinkServesOn_IoctlSaysWhyAndFreesTheDevice(string mode)
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonDevice);
        var r = run.One("stopcont", ("mode", mode));
        Expect.Equal(run, r, "connected", "yes");
        Expect.Equal(run, r, "kernel_marker", 1);
        Expect.Equal(run, r, "kernel_io_errors", 0);
        if (mode == "netlink")
        {
            Expect.Equal(run, r, "alive", "yes");
            Expect.Equal(run, r, "read_bytes", 4 * 1024 * 1024);
            Expect.Equal(run, r, "kernel_shutting_down", 0);
            Expect.Equal(run, r, "exit_rc", 0);
        }
        else if (r["alive"] == "no")
        {
            // The driver shut the connection down: the reason named, exit 1.
            Expect.Equal(run, r, "said_interrupted", "yes");
            Expect.Equal(run, r, "exit_rc", 1);
        }
        else
        {
            // A driver that keeps the connection across the stop: then it must really serve.
            Expect.Equal(run, r, "read_bytes", 4 * 1024 * 1024);
            Expect.Equal(run, r, "exit_rc", 0);
        }

        Expect.Equal(run, r, "freed", "yes");
    }
}

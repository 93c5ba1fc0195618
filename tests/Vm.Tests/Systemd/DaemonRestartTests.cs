using System.Globalization;
using System.Text;
using Xunit.Abstractions;
using Xunit.Sdk;

namespace Vm.Tests.Systemd;

/// <summary>
/// Boots the full tier once with tests/vm/systemd/scenarios/restart.sh: the daemon restarted, SIGKILLed and stopped
/// by systemd under a mounted ext4 on a netlink mapping. Its own VM (the scenario needs a clean device and a
/// configuration of its own), so its own collection. Missing tools or a failed boot fail every test with the reason.
/// </summary>
public sealed class SystemdRestartFixture : IAsyncLifetime
{
    // A quiet host runs the scenario in ~4 min; a start that outlasts the image's 60 s start timeout under load
    // costs a retry (each wait in the scenario allows 180 s).
    private static readonly TimeSpan VmTimeout = TimeSpan.FromSeconds(900);

    private readonly StringBuilder _log = new();
    private SystemdVmResults _results = SystemdVmResults.Parse(string.Empty);
    private string? _setupError;

    public string LogPath { get; } = Path.Combine(AppContext.BaseDirectory, "systemd-restart-vm-serial.log");

    public async Task InitializeAsync()
    {
        try
        {
            _setupError = await RunAsync().ConfigureAwait(false);
        }
        finally
        {
            await File.WriteAllTextAsync(LogPath, _log.ToString()).ConfigureAwait(false);
        }
    }

    public Task DisposeAsync() => Task.CompletedTask;

    private async Task<string?> RunAsync()
    {
        if (SystemdVmFixture.HostError() is { } hostError)
        {
            return hostError;
        }

        var repo = SystemdVmFixture.FindRepoRoot();
        var rootfs = await VmFixture.ExecAsync("bash", [Path.Combine(repo, "tests", "vm", "systemd", "build-rootfs.sh")], TimeSpan.FromMinutes(15)).ConfigureAwait(false);
        if (rootfs.Code != 0)
        {
            return $"tests/vm/systemd/build-rootfs.sh failed (exit {rootfs.Code}):\n{SystemdVmFixture.Tail(rootfs.Output, 30)}";
        }

        var (publishDir, publishError) = await DaemonPublish.GetAsync().ConfigureAwait(false);
        if (publishError is not null)
        {
            return publishError;
        }

        var vm = await VmFixture.ExecAsync(
            "bash",
            [
                Path.Combine(repo, "tests", "vm", "systemd", "run.sh"),
                "--scenario", Path.Combine(repo, "tests", "vm", "systemd", "scenarios", "restart.sh"),
                "--publish", publishDir!,
                "--timeout", ((int)VmTimeout.TotalSeconds - 30).ToString(CultureInfo.InvariantCulture),
            ],
            VmTimeout).ConfigureAwait(false);
        _log.Append("== run.sh (exit ").Append(vm.Code).Append(")\n").Append(vm.Output);
        _results = SystemdVmResults.Parse(vm.Output);
        VmFixture.SaveConsole(repo, "systemd-restart.sh", vm.Output);
        return _results.Values.ContainsKey("end")
            ? null
            : $"the VM scenario did not run to its end (run.sh exit {vm.Code}); last output:\n{SystemdVmFixture.Tail(vm.Output, 40)}";
    }

    /// <summary>The value printed as <c>RESULT systemd rs_KEY=</c>; fails the calling test when absent.</summary>
    public string Value(string key)
    {
        if (_results.TryGet("rs_" + key, out var value))
        {
            return value;
        }

        throw new XunitException($"the VM run printed no 'RESULT systemd rs_{key}=' line.{(_setupError is null ? string.Empty : "\n" + _setupError)}\nfull log: {LogPath}");
    }

    public long Number(string key)
    {
        var text = Value(key);
        return SystemdVmResults.TryParseLong(text, out var n)
            ? n
            : throw new XunitException($"RESULT systemd rs_{key}='{text}' is not an integer (log: {LogPath})");
    }

}

[CollectionDefinition(Name)]
public sealed class SystemdRestartCollection : ICollectionFixture<SystemdRestartFixture>
{
    public const string Name = "systemd restart VM";
}

/// <summary>
/// A netlink mapping "fs" (OnStop=Leave) to nbdkit, ext4 mounted on /dev/nbd0 with a writer running, while systemd
/// restarts the daemon, SIGKILLs it (Restart=on-failure brings it back), and the server is killed and restarted;
/// then the default OnStop=Disconnect makes `systemctl stop` free the device; last, the same mapping with Relay: true
/// and Connections: 2 through two `systemctl restart`s, its relays handed over through systemd's file descriptor store,
/// then a SIGKILL of it.
/// </summary>
[Collection(SystemdRestartCollection.Name)]
public sealed class DaemonRestartTests(SystemdRestartFixture vm, ITestOutputHelper output)
{
    private const long ExportSectors = (512L << 20) / 512;

    /// <summary>Reconnect:MaxDelay 1 s plus connect + handshake + RECONFIGURE under TCG on a shared host.</summary>
    private const long ReconnectBoundMs = 1000 + 6000;

    [Fact]
    public void Setup_MappingCarriesMountedExt4()
    {
        Assert.Equal("yes", vm.Value("daemon_installed"));
        foreach (var tool in new[] { "nbdkit", "mkfs_ext4", "e2fsck", "sha256sum" })
        {
            Assert.True(vm.Value("tool_" + tool) == "yes", $"{tool} missing in the full-tier image");
        }

        Assert.Equal("up", vm.Value("server"));
        Assert.Equal("0", vm.Value("start_rc"));
        Assert.Equal(ExportSectors, vm.Number("start_size"));
        Assert.Equal("nbd-daemon:fs", vm.Value("start_backend"));
        Assert.Equal("0", vm.Value("mkfs_rc"));
        Assert.Equal("0", vm.Value("mount_rc"));
    }

    [Fact]
    public void Unit_RestartPolicy_RestartsAfterAKill()
    {
        Assert.Equal("on-failure", vm.Value("unit_Restart"));
        // A crash costs RestartSec plus the start as a pause on every device (see the unit file).
        Assert.Equal("1s", vm.Value("unit_RestartUSec"));
        Assert.Equal("0", vm.Value("unit_StartLimitIntervalUSec"));
    }

    [Fact]
    public void Restart_SystemctlRestart_NewProcessAdoptsTheMountedDevice()
    {
        // systemctl's own exit code and the restart count are reported, not asserted: under TCG on a loaded host a
        // .NET start can outlast the image's 60 s start timeout, and systemd's Restart= then starts it again.
        output.WriteLine($"systemctl restart rc {vm.Value("restart_rc")}, active again after {vm.Value("restart_ms")} ms " +
                         $"(READY {vm.Value("restart_ready_ms")} ms after exec, {vm.Value("restart_NRestarts_delta")} automatic restarts), " +
                         $"writer stall {vm.Value("restart_stall_ms")} ms");
        Assert.Equal("yes", vm.Value("restart_active"));
        Assert.True(vm.Number("restart_adopted") >= 1, "no journal entry of the new process (MAPPING=fs) mentions adoption");
        Assert.Equal("0", vm.Value("restart_probe_rc"));
    }

    [Fact]
    public void Kill_SigkillOfTheDaemon_SystemdRestartsItAndItAdoptsTheDevice()
    {
        AssertRestartedAfterSigkill("kill_");
        Assert.True(vm.Number("kill_adopted") >= 1, "no journal entry of the restarted process (MAPPING=fs) mentions adoption");
        Assert.Equal("0", vm.Value("kill_probe_rc"));
    }

    [Fact]
    public void Device_ThroughRestartAndKill_NeverFreed()
    {
        // Sampled from before the restart until after the server outage (114 samples in a loaded-host run).
        Assert.True(vm.Number("device_samples") >= 20, "the device monitor hardly ran");
        Assert.Equal(0, vm.Number("device_size_changed"));
        Assert.Equal(0, vm.Number("device_pid_absent"));
        Assert.Equal(0, vm.Number("device_backend_changed"));
    }

    [Fact]
    public void Server_KilledAfterAdoption_AdoptedMappingReconnects()
    {
        long after = vm.Number("server_io_after_up_ms");
        output.WriteLine($"I/O {after} ms after the server was back, writer stall {vm.Value("server_stall_ms")} ms");
        Assert.Equal("0", vm.Value("server_probe_rc"));
        Assert.True(after <= ReconnectBoundMs, $"I/O flowed {after} ms after the server was back");
        Assert.Equal("yes", vm.Value("server_same_pid"));
        Assert.True(vm.Number("server_reconnecting") >= 1, "the adopting process never logged '-> Reconnecting' for the server kill");
    }

    [Fact]
    public void Writer_ThroughEverything_SeesNoErrorAndKernelLogsNone()
    {
        output.WriteLine($"writer: {vm.Value("writer_ops")} operations, longest {vm.Value("writer_max_stall_ms")} ms");
        Assert.True(vm.Number("writer_ops") >= 20, "the writer hardly ran");
        Assert.Equal(0, vm.Number("writer_errors"));
        Assert.Equal(0, vm.Number("kernel_io_errors"));
        Assert.Equal(0, vm.Number("kernel_ext4_errors"));
    }

    [Fact]
    public void Fsck_AfterwardsFilesystemCleanAndEveryChecksumMatches()
    {
        Assert.Equal("0", vm.Value("umount_rc"));
        Assert.Equal("0", vm.Value("fsck_rc"));
        Assert.Equal("0", vm.Value("remount_rc"));
        Assert.True(vm.Number("check_files") >= 10, "fewer than 10 files in the manifest: nothing much was verified");
        Assert.Equal(vm.Number("check_files"), vm.Number("check_files_on_fs"));
        Assert.Equal(0, vm.Number("check_mismatches"));
    }

    [Fact]
    public void Stop_DefaultOnStopDisconnect_FreesTheDevice()
    {
        Assert.Equal("yes", vm.Value("stop_restart_active"));
        Assert.True(vm.Number("stop_adopted") >= 1, "the process with the default OnStop did not adopt the device");
        Assert.Equal(ExportSectors, vm.Number("stop_before_size"));
        Assert.Equal("0", vm.Value("stop_rc"));
        Assert.Equal("inactive", vm.Value("stop_ActiveState"));
        Assert.Equal("success", vm.Value("stop_Result"));
        Assert.Equal("0", vm.Value("stop_size"));
        Assert.Equal("absent", vm.Value("stop_pid"));
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    public void Relay_SystemctlRestart_EndHandedOverThroughTheFdStoreAndResumedWithoutReconnecting(int restart)
    {
        string p = $"relay_restart{restart}_";
        output.WriteLine($"systemctl restart rc {vm.Value(p + "rc")}, active again after {vm.Value(p + "ms")} ms (READY {vm.Value(p + "ready_ms")} ms after exec), " +
                         $"writer stall {vm.Value(p + "stall_ms")} ms, NFileDescriptorStore after {vm.Value(p + "fdstore_after")}");
        Assert.Equal("yes", vm.Value("relay_start_active"));
        Assert.True(vm.Number("relay_start_connected") >= 1, "the relay mapping did not start with NBD_CMD_CONNECT on the freed device");
        Assert.Equal("yes", vm.Value(p + "active"));
        // Connections: 2, so two relays, two journal groups in the store (nbd-journal/fs/…), two resumed.
        Assert.True(vm.Number(p + "handed_over") == 2, $"the stopping process logged {vm.Value(p + "handed_over")} of 2 relay ends handed to the file descriptor store");
        Assert.True(vm.Number(p + "resumed") == 2, $"the new process resumed {vm.Value(p + "resumed")} of 2 relays on the handed-over ends");
        Assert.True(vm.Number(p + "carried_on") == 1, "the new process did not adopt the device with both handed-over connections");

        // The kernel's connection never ended: nothing to reconfigure, no lost connection; both groups stay in the store
        // while the new process relays (3 descriptors each).
        Assert.Equal(0, vm.Number(p + "reconfigure"));
        Assert.Equal(0, vm.Number(p + "reconnecting"));
        Assert.Equal(6, vm.Number(p + "fdstore_after"));
        Assert.Equal("0", vm.Value(p + "probe_rc"));
    }

    /// <summary>
    /// The server down across `systemctl restart`: the stopping process hands both ends over, nbdkit is killed before the
    /// new process connects, so its first attempts are refused while the writer's requests queue in the handed-over ends.
    /// The ends stay with the mapping until it serves again (they used to be closed once every mapping had tried once,
    /// and the requests queued in them then waited for the 60 s hand-over timeout), and it resumes on both.
    /// </summary>
    [Fact]
    public void Relay_ServerDownAcrossRestart_EndsKeptUntilTheMappingServesAndResumed()
    {
        output.WriteLine($"nbdkit killed {vm.Value("relay_down_server_killed_after_ms")} ms after the restart was queued; " +
                         $"{vm.Value("relay_down_refused")} refused attempts logged before it came back; writer stall after it was back {vm.Value("relay_down_stall_after_back_ms")} ms");
        Assert.Equal("0", vm.Value("relay_down_restart_rc"));
        Assert.True(vm.Number("relay_down_refused") >= 1, "the new process was never refused: the server was not down when it started");
        Assert.Equal("yes", vm.Value("relay_down_server_back"));
        Assert.Equal("yes", vm.Value("relay_down_active"));
        Assert.True(vm.Number("relay_down_handed_over") == 2, $"the stopping process logged {vm.Value("relay_down_handed_over")} of 2 relay ends handed over");
        Assert.Equal(0, vm.Number("relay_down_unclaimed"));
        Assert.True(vm.Number("relay_down_resumed") == 2, $"the new process resumed {vm.Value("relay_down_resumed")} of 2 relays once the server was back");
        Assert.Equal(6, vm.Number("relay_down_fdstore_after"));
        Assert.Equal("0", vm.Value("relay_down_probe_rc"));
        // Reconnect:MaxDelay does not apply (the held schedule retries every ~0.25 s) but a connect + handshake under TCG does.
        Assert.True(vm.Number("relay_down_stall_after_back_ms") <= ReconnectBoundMs, $"the writer stalled {vm.Value("relay_down_stall_after_back_ms")} ms after the server was back (limit {ReconnectBoundMs})");
        Assert.Equal(0, vm.Number("relay_down_kernel_io_errors"));
        Assert.Equal(0, vm.Number("relay_down_kernel_nbd_lines"));
    }

    /// <summary>
    /// The server back across `systemctl restart` but taking one connection at a time (nbdkit's limit filter): each
    /// attempt of the new process takes a handed-over end with its first connection and is refused the second. The end
    /// goes back to the store untouched (it used to be closed, ending one of the kernel's two connections: "Receive
    /// control failed" and a dead connection in the kernel log), and once nbdkit takes both again, both ends resume.
    /// </summary>
    [Fact]
    public void Relay_SecondConnectionRefusedAcrossRestart_TakenEndGivenBackAndBothResumed()
    {
        output.WriteLine($"{vm.Value("relay_partial_failed_attempts")} failed attempts, {vm.Value("relay_partial_given_back")} ends given back; " +
                         $"writer stall after nbdkit took both connections again {vm.Value("relay_partial_stall_after_back_ms")} ms");
        Assert.Equal("0", vm.Value("relay_partial_restart_rc"));
        Assert.Equal("up", vm.Value("relay_partial_limited_server"));
        Assert.True(vm.Number("relay_partial_failed_attempts") >= 2, "the new process did not fail twice against the one-connection server");
        Assert.True(vm.Number("relay_partial_given_back") >= 1, "no taken relay end was given back after a partial failure");
        Assert.Equal("yes", vm.Value("relay_partial_server_back"));
        Assert.Equal("yes", vm.Value("relay_partial_active"));
        Assert.True(vm.Number("relay_partial_handed_over") == 2, $"the stopping process logged {vm.Value("relay_partial_handed_over")} of 2 relay ends handed over");
        Assert.True(vm.Number("relay_partial_resumed") == 2, $"the new process resumed {vm.Value("relay_partial_resumed")} of 2 relays");
        Assert.Equal(0, vm.Number("relay_partial_unclaimed"));
        Assert.Equal(6, vm.Number("relay_partial_fdstore_after"));
        Assert.Equal("0", vm.Value("relay_partial_probe_rc"));
        Assert.True(vm.Number("relay_partial_stall_after_back_ms") <= ReconnectBoundMs, $"the writer stalled {vm.Value("relay_partial_stall_after_back_ms")} ms after the server was back (limit {ReconnectBoundMs})");
        Assert.Equal(0, vm.Number("relay_partial_kernel_io_errors"));
        Assert.Equal(0, vm.Number("relay_partial_kernel_nbd_lines"));
    }

    /// <summary>
    /// A crash of a relay mapping's daemon under load: each relay's journal and both ends of its kernel connection are in
    /// systemd's file descriptor store all along, so the kernel's connections live on; the process Restart= brings back
    /// takes both groups, adopts the device with them (no new connection) and recovers: a reply the kill cut off is
    /// finished, the requests not answered are resent. The writer waits for the restart only; without the journal it
    /// waited for the rest of the mapping's Timeout too (30 s here).
    /// </summary>
    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void Relay_Sigkill_NextProcessRecoversFromTheJournalsAndTheStallIsTheRestart(int kill)
    {
        string p = $"relay_kill{kill}_";
        AssertRestartedAfterSigkill(p);
        long back = vm.Number(p + "back_ms");
        long stall = vm.Number(p + "stall_ms");
        output.WriteLine($"{vm.Value(p + "inflight")} block requests in flight at the kill; {vm.Value(p + "resent")} requests resent and {vm.Value(p + "finished")} reply bytes finished from the journals");
        Assert.Equal(0, vm.Number(p + "refused"));
        Assert.True(vm.Number(p + "resumed") == 2, $"the restarted process resumed {vm.Value(p + "resumed")} of 2 relays from their journals");
        Assert.Equal(0, vm.Number(p + "reconfigure"));
        Assert.Equal(6, vm.Number(p + "fdstore_after"));
        Assert.Equal("0", vm.Value(p + "probe_rc"));
        Assert.True(stall <= back + ReconnectBoundMs, $"the writer stalled {stall} ms; the daemon was back {back} ms after the kill (limit: that + {ReconnectBoundMs} ms)");
    }

    /// <summary>The kills above came under load: the block layer had requests of the device in flight.</summary>
    [Fact]
    public void Relay_Sigkill_KillsCameWithRequestsInFlightAndNoConnectionEnded()
    {
        long[] inflight = [.. Enumerable.Range(1, 3).Select(k => vm.Number($"relay_kill{k}_inflight"))];
        output.WriteLine($"in flight at the kills: {string.Join(", ", inflight)}; {vm.Value("relay_kill_kernel_nbd_lines")} nbd0 lines in the kernel log");
        Assert.True(inflight.Count(n => n > 0) >= 2, $"only {inflight.Count(n => n > 0)} of 3 kills came with a request in flight");
        Assert.Equal(0, vm.Number("relay_kill_kernel_io_errors"));
        Assert.Equal(0, vm.Number("relay_kill_kernel_nbd_lines"));
    }

    [Fact]
    public void Relay_ThroughBothRestartsAndTheKill_WriterKernelFsckAndChecksumsClean()
    {
        output.WriteLine($"writer: {vm.Value("relay_writer_ops")} operations, longest {vm.Value("relay_writer_max_stall_ms")} ms");
        Assert.Equal("0", vm.Value("relay_mount_rc"));
        Assert.True(vm.Number("relay_writer_ops") >= 20, "the writer hardly ran");
        Assert.Equal(0, vm.Number("relay_writer_errors"));
        Assert.Equal(0, vm.Number("relay_kernel_io_errors"));

        // The driver logs every connection it loses (receive failed, timed out, dead): none while the relays were handed
        // over (the kernel log up to the SIGKILL; the kill's own is checked above).
        Assert.Equal(0, vm.Number("relay_kernel_nbd_lines"));
        Assert.Equal("0", vm.Value("relay_umount_rc"));
        Assert.Equal("0", vm.Value("relay_fsck_rc"));
        Assert.Equal("0", vm.Value("relay_remount_rc"));
        Assert.True(vm.Number("relay_check_files") >= 10, "fewer than 10 files in the manifest: nothing much was verified");
        Assert.Equal(0, vm.Number("relay_check_mismatches"));
    }

    /// <summary>The keys restart.sh's sigkill function reports under PREFIX: the kill went through and Restart= brought a new process.</summary>
    private void AssertRestartedAfterSigkill(string prefix)
    {
        output.WriteLine($"active again {vm.Value(prefix + "back_ms")} ms after the kill (READY {vm.Value(prefix + "ready_ms")} ms after exec, " +
                         $"{vm.Value(prefix + "NRestarts_delta")} automatic restarts), writer stall {vm.Value(prefix + "stall_ms")} ms");
        Assert.Equal("0", vm.Value(prefix + "rc"));
        Assert.Equal("yes", vm.Value(prefix + "restarted"));
        Assert.True(vm.Number(prefix + "NRestarts_delta") >= 1, "systemd did not count an automatic restart after the SIGKILL");
    }
}

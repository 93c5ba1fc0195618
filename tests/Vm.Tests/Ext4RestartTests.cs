using Xunit.Abstractions;

namespace Vm.Tests;

/// <summary>
/// The VM run of tests/vm/scenarios/ext4-restarts.sh. The number of server restarts is 3 unless the environment
/// variable <c>NBD_VM_EXT4_RESTARTS</c> asks for more (the full run is 10); the scenario reads it as
/// <c>EXT4_RESTARTS</c>, so another count runs a copy of the script with that assignment prepended.
/// </summary>
internal static class Ext4RestartScenario
{
    public const string RestartsVariable = "NBD_VM_EXT4_RESTARTS";

    public const int DefaultRestarts = 3;

    /// <summary>Reconnect:MaxDelay of the mapping.</summary>
    public const long MaxDelayMs = 1000;

    /// <summary>Connect + handshake + RECONFIGURE under TCG on a shared 2-core host, plus the shell's polling.</summary>
    public const long TcgSlackMs = 4000;

    public const long ExportBytes = 512L << 20;

    public static int Restarts { get; } = ScenarioCount.Read(RestartsVariable, DefaultRestarts, 100);

    public static ScenarioSpec Spec { get; } = new(
        ScenarioCount.Script("ext4-restarts.sh", "EXT4_RESTARTS", Restarts, DefaultRestarts), ["nbdkit", "mkfs.ext4", "e2fsck"], true, 300 + (60 * Restarts));
}

/// <summary>
/// ext4 on a netlink mapping (DeadConnectionTimeout 60 s) while a writer creates checksummed files and its nbdkit
/// server is SIGKILLed and restarted after 1–3 s, <see cref="Ext4RestartScenario.Restarts"/> times: no application
/// or kernel error, a clean e2fsck, every file intact.
/// </summary>
[Collection(VmCollection.Name)]
public sealed class Ext4RestartTests(VmFixture vm, ITestOutputHelper output)
{
    [Fact]
    public async Task Scenario_VmTools_AllPresent()
    {
        var run = await vm.RunAsync(Ext4RestartScenario.Spec);
        var r = run.One("tools");
        foreach (var tool in new[] { "nbdkit", "mkfs_ext4", "e2fsck", "daemon", "random" })
        {
            Expect.Equal(run, r, tool, "yes");
        }
    }

    [Fact]
    public async Task Setup_NetlinkMapping_CarriesAFreshExt4()
    {
        var run = await vm.RunAsync(Ext4RestartScenario.Spec);
        var r = run.One("setup");
        output.WriteLine(r.Raw);
        Expect.Equal(run, r, "connected", "yes");
        Expect.Equal(run, r, "size", Ext4RestartScenario.ExportBytes);
        Expect.Equal(run, r, "mkfs_rc", 0);
        Expect.Equal(run, r, "mount_rc", 0);
    }

    [Fact]
    public async Task Restarts_EachServerRestart_IoFlowsAgainWithinTheBackoff()
    {
        var run = await vm.RunAsync(Ext4RestartScenario.Spec);
        var restarts = run.Results.Where(l => l.Scenario == "ext4_restart").ToList();
        foreach (var r in restarts)
        {
            output.WriteLine(r.Raw);
        }

        Assert.True(restarts.Count == Ext4RestartScenario.Restarts,
            $"expected {Ext4RestartScenario.Restarts} 'RESULT ext4_restart' lines, found {restarts.Count}\n{run.Tail()}");
        foreach (var r in restarts)
        {
            // The O_DIRECT read issued right after the server came back: held by the kernel, never failed.
            Expect.Equal(run, r, "probe_rc", 0);
            long after = r.Long("io_after_up_ms");
            Expect.That(run, r, after <= Ext4RestartScenario.MaxDelayMs + Ext4RestartScenario.TcgSlackMs,
                $"I/O flowed {after} ms after the server was back; the backoff is capped at {Ext4RestartScenario.MaxDelayMs} ms");
        }
    }

    [Fact]
    public async Task Writer_ServerKilledRepeatedly_SeesNoWriteOrSyncError()
    {
        var run = await vm.RunAsync(Ext4RestartScenario.Spec);
        var r = run.One("ext4");
        output.WriteLine(r.Raw);
        Expect.Equal(run, r, "restarts", Ext4RestartScenario.Restarts);
        // The kills reached the mapping: the daemon went through Reconnecting at least once per kill.
        Expect.That(run, r, r.Long("reconnecting_lines") >= Ext4RestartScenario.Restarts,
            $"the daemon logged '-> Reconnecting' {r["reconnecting_lines"]} times for {Ext4RestartScenario.Restarts} server kills");
        // A floor, not a rate: a loaded host runs the writer at a fraction of its quiet speed (76 operations for
        // 10 restarts at load 11, 169 when quiet).
        Expect.That(run, r, r.Long("ops") >= 20, "the writer hardly ran");
        Expect.Equal(run, r, "write_errors", 0);
        Expect.Equal(run, r, "probe_fails", 0);
    }

    [Fact]
    public async Task Kernel_ServerKilledRepeatedly_LogsNoIoOrExt4Error()
    {
        var run = await vm.RunAsync(Ext4RestartScenario.Spec);
        var r = run.One("ext4");
        Expect.Equal(run, r, "kernel_io_errors", 0);
        Expect.Equal(run, r, "ext4_errors", 0);
    }

    [Fact]
    public async Task Fsck_AfterRestarts_FilesystemIsClean()
    {
        var run = await vm.RunAsync(Ext4RestartScenario.Spec);
        var r = run.One("ext4");
        Expect.Equal(run, r, "umount_rc", 0);
        Expect.Equal(run, r, "fsck_rc", 0);
    }

    [Fact]
    public async Task Verify_AfterRemount_EveryWrittenFileMatchesItsChecksum()
    {
        var run = await vm.RunAsync(Ext4RestartScenario.Spec);
        var r = run.One("ext4");
        Expect.Equal(run, r, "remount_rc", 0);
        Expect.That(run, r, r.Long("files") >= 10, "fewer than 10 files in the manifest: nothing much was verified");
        Expect.Equal(run, r, "files_on_fs", r.Long("files"));
        Expect.Equal(run, r, "checksum_mismatches", 0);
    }

    [Fact]
    public async Task Mapping_ThroughRestarts_KeepsItsDeviceAndStopsCleanly()
    {
        var run = await vm.RunAsync(Ext4RestartScenario.Spec);
        var r = run.One("ext4");
        Expect.Equal(run, r, "daemon_alive", "yes");
        Expect.Equal(run, r, "pid", "present");
        Expect.Equal(run, r, "size", Ext4RestartScenario.ExportBytes);
        var stop = run.One("stop");
        Expect.Equal(run, stop, "exit_rc", 0);
        Expect.Equal(run, stop, "freed", "yes");
    }
}

using Xunit.Abstractions;

namespace Vm.Tests;

/// <summary>The VM run of tests/vm/scenarios/relay-crash.sh; NBD_VM_RELAY_CRASH_KILLS asks for another count of kills.</summary>
internal static class RelayCrashScenario
{
    public const string KillsVariable = "NBD_VM_RELAY_CRASH_KILLS";

    public const int DefaultKills = 10;

    /// <summary>The device's request Timeout in the scenario: a stall this long would mean the driver timed out.</summary>
    public const long TimeoutMs = 30_000;

    public static int Kills { get; } = ScenarioCount.Read(KillsVariable, DefaultKills, 500);

    public static ScenarioSpec Spec { get; } = new(ScenarioCount.Script("relay-crash.sh", "RELAY_CRASH_KILLS", Kills, DefaultKills), ["nbd-server"], false, 300 + (60 * Kills))
    {
        NeedsTools = true,
        NeedsRelayChild = true,
    };
}

/// <summary>
/// The relay's journal on the real driver: a relay process (tests/Nbd.RelayChild) SIGKILLed
/// <see cref="RelayCrashScenario.Kills"/> times under a write-then-verify load (nbd-verify, O_DIRECT 4 KiB blocks over
/// 32 MiB) on an ioctl device whose driver's end, our end and journal outlive it in another process, as systemd's file
/// descriptor store would keep them. Each successor recovers from the journal; the driver must never see a duplicate,
/// a cut or a missing reply (it would fail the I/O or end the connection), and must never time a request out: the
/// longest stall is the successor's start, not the request Timeout.
/// </summary>
[Collection(VmCollection.Name)]
public sealed class RelayCrashTests(VmFixture vm, ITestOutputHelper output)
{
    private async Task<(VmRun Run, ResultLine Keeper, ResultLine Load)> RunAsync()
    {
        var run = await vm.RunAsync(RelayCrashScenario.Spec);
        var keeper = run.One("relay-crash-keeper");
        var load = run.One("relay-crash");
        output.WriteLine(keeper.Raw);
        output.WriteLine(load.Raw);
        return (run, keeper, load);
    }

    [Fact]
    public async Task RelayKilledUnderLoad_EverySuccessorRecovers_NoIoErrorNoVerifyFailure()
    {
        var (run, keeper, load) = await RunAsync();
        Expect.Equal(run, keeper, "kills", RelayCrashScenario.Kills);
        Expect.Equal(run, keeper, "refused", 0);
        // The kills that matter: the driver waited for a reply (a request of the block layer in flight on the device, which
        // the direct path would hold for the request Timeout), and some with the request read by the relay, unanswered.
        Expect.That(run, keeper, keeper.Long("in_flight_at_kill") >= RelayCrashScenario.Kills / 2, "fewer than half the kills came with a request in flight: the test proved little");
        Expect.That(run, keeper, keeper.Long("with_pending") >= 1, "no kill left a request the relay had read unanswered");
        Expect.Equal(run, keeper, "stopped", "yes");
        Expect.Equal(run, load, "direct", "yes");
        Expect.Equal(run, load, "app_io_errors", 0);
        Expect.Equal(run, load, "kernel_io_errors", 0);
        Expect.Equal(run, load, "verify_failures", 0);
        Expect.That(run, load, load.Long("final_checked") > 0, "the verifier checked no block at the end");
        Expect.That(run, load, load.Long("writes") > 0 && load.Long("reads") > 0, "no I/O ran");
    }

    [Fact]
    public async Task RelayKilledUnderLoad_LongestStallIsTheRestartNotTheRequestTimeout()
    {
        var (run, keeper, load) = await RunAsync();

        // The successor's start under TCG, plus the verifier's own gap measure (300 ms) and slack.
        long bound = keeper.Long("restart_ms_max") + 3000;
        Expect.That(run, load, load.Long("max_gap_ms") >= 0 && load.Long("max_gap_ms") <= bound,
            $"the longest I/O stall was {load["max_gap_ms"]} ms, more than the slowest successor start ({keeper["restart_ms_max"]} ms) + 3 s");
        Expect.That(run, load, load.Long("max_gap_ms") < RelayCrashScenario.TimeoutMs, "a stall as long as the request Timeout: the driver resent instead of the successor");
    }
}

using Xunit.Abstractions;

namespace Vm.Tests;

/// <summary>The VM run of tests/vm/scenarios/faults.sh (default CI counts; tests/vm/faults.sh --full for more).</summary>
internal static class FaultScenario
{
    public static readonly ScenarioSpec Spec = new("faults.sh", ["nbdkit"], true, 900) { NeedsTools = true };

    public const long ExportBytes = 64L << 20;

    public const long WrongExportBytes = 48L << 20;

    /// <summary>The mappings' Timeout (kernel request timeout) in the scenario.</summary>
    public const long TimeoutMs = 5000;

    /// <summary>
    /// Bound on the longest I/O stall after the server accepts again, Netlink. A request in flight when the link
    /// died is resent only when the kernel's request timeout fires (Timeout after it was sent), however fast the
    /// daemon reconnected (it retries every 250 ms): so the stall after back is about Timeout minus the time the
    /// server was away. Measured (CI runs, TCG): S1 down 1 s → 3.6–3.7 s, down 2 s → 2.5 s, down 3 s → 0.2 s; S3 cut
    /// (back at once) → 4.9–5.0 s; S5/S6 server kill after the restart → 3.6–4.0 s; where no request was in flight
    /// on a dead link it is 0.05–0.4 s (S2 SIGCONT, S4, S3 reset and stalls, the daemon restarts themselves).
    /// The bound is the Timeout plus 2 s of TCG slack for the reconnect and the resend. The 1 s goal is met
    /// only in the second group; the first needs a shorter Timeout (a timeout on a live but slow link also marks the
    /// socket dead and reconnects) or the kernel requeueing in-flight requests on RECONFIGURE.
    /// </summary>
    public const long NetlinkStallBoundMs = TimeoutMs + 2000;

    /// <summary>Faults per round: S3 = cut, reset, stall 2 s, stall 7 s; S5/S6 = the daemon restart, then a server kill.</summary>
    public static long FaultsPerRound(string scenario) => scenario switch
    {
        "S3" => 4,
        "S5" or "S6" => 2,
        _ => 1,
    };
}

/// <summary>
/// Fault injection under a write-then-verify load (nbd-verify, O_DIRECT 4 KiB blocks over 32 MiB) on daemon
/// mappings against nbdkit: S1 server SIGKILLed and restarted after 1..3 s (3 times), S2 SIGSTOP beyond the request
/// timeout, S3 fault-proxy cut / reset / stall 2 s / stall 7 s, S4 the export back with another size for 4 s,
/// S5 the daemon SIGKILLed and started again, S6 (Netlink) the daemon stopped with OnStop=Leave and started again
/// (S5/S6 then kill the server once more, so the new daemon has to run the mapping), S7 the server stopped
/// gracefully (SIGTERM) and started again after 1 s (3 times).
/// Netlink (DeadConnectionTimeout 60 s) must hide every fault from the application; Ioctl must serve again after
/// every round, and data written after its last I/O error must read back intact (its application sees EIO,
/// closes, reopens).
/// </summary>
[Collection(VmCollection.Name)]
public sealed class FaultTests(VmFixture vm, ITestOutputHelper output)
{
    private Task<(VmRun Run, FaultRow Row)> CaseAsync(string scenario, string iface) =>
        FaultCase.CheckAsync(vm, FaultScenario.Spec, "0", scenario, iface, output);

    [Theory]
    [InlineData("S1")]
    [InlineData("S2")]
    [InlineData("S3")]
    [InlineData("S4")]
    [InlineData("S5")]
    [InlineData("S6")]
    public async Task Fault_Netlink_ApplicationSeesNoErrorAndIoResumesWithinTimeout(string scenario)
    {
        var (run, row) = await CaseAsync(scenario, "Netlink");
        Expect.Equal(run, row.Line, "app_io_errors", 0);
        Expect.Equal(run, row.Line, "kernel_io_errors", 0);
        // Every acknowledged write reads back (a write that failed may or may not have landed; both are accepted).
        Expect.Equal(run, row.Line, "verify_failures", 0);
        Expect.That(run, row.Line, row.MaxStallAfterBackMs <= FaultScenario.NetlinkStallBoundMs,
            $"I/O stalled {row.MaxStallAfterBackMs} ms after the server accepted again (bound: Timeout {FaultScenario.TimeoutMs} ms + 2 s)");
        if (scenario == "S4")
        {
            // The kernel holds I/O on the device while the daemon refuses the wrong export: never resized, not even to 0.
            Expect.Equal(run, row.Line, "sizes_during", FaultScenario.ExportBytes);
        }

        if (scenario is "S5" or "S6")
        {
            // The device kept serving on the kernel's sockets with no daemon, and the new daemon adopted it.
            Expect.Equal(run, row.Line, "device_while_down", "configured");
            Expect.Equal(run, row.Line, "adopted", "yes");
            // So the restart itself costs the application nothing on the direct path: issue 6's 1 s goal holds for the
            // restart step (the server kill that follows it stalls ≈ Timeout, as S1). With the relay it does not: see
            // FaultRelayTests.
            var restarts = FaultReport.Rounds(run.Output, scenario, "Netlink").Where(n => n["step"].StartsWith("daemon-", StringComparison.Ordinal)).ToList();
            Expect.That(run, row.Line, restarts.Count == row.Rounds, $"{restarts.Count} daemon restart steps reported for {row.Rounds} rounds");
            foreach (var restart in restarts)
            {
                Expect.That(run, row.Line, restart.Long("stall_after_back_ms") <= FaultRelayScenario.StallGoalMs,
                    $"I/O stalled longer than {FaultRelayScenario.StallGoalMs} ms after the daemon restart: NOTE {restart.Raw}");
            }
        }
    }

    [Theory]
    [InlineData("S1")]
    [InlineData("S2")]
    [InlineData("S3")]
    [InlineData("S4")]
    [InlineData("S5")]
    [InlineData("S7")]
    public async Task Fault_Ioctl_ServesAgainAfterEveryRoundAndDataWrittenAfterRecoveryVerifies(string scenario)
    {
        var (run, row) = await CaseAsync(scenario, "Ioctl");
        Expect.Equal(run, row.Line, "verify_failures_recent", 0);
        if (scenario == "S4")
        {
            // The driver drops an ioctl device to size 0 while the daemon reconnects; never to the wrong size.
            foreach (var size in row.Line["sizes_during"].Split(','))
            {
                Expect.That(run, row.Line, size is "0" || size == FaultScenario.ExportBytes.ToString(System.Globalization.CultureInfo.InvariantCulture),
                    $"device size {size} while the server offered {FaultScenario.WrongExportBytes} bytes");
            }
        }
    }

    /// <summary>
    /// S7, the server stopped gracefully: nbdkit answers what it reads until it exits with NBD_ESHUTDOWN, and on the
    /// direct path that reply goes from the server to the driver, which fails the request ("Other side returned error
    /// (108)"): the daemon is not in the data path and cannot hide it (measured: 48 application errors over 3 stops).
    /// What holds: the device serves again after every stop and no acknowledged write is lost. With Relay: true the
    /// relay resends such a request instead (FaultRelayTests, S7: 0 errors).
    /// </summary>
    [Fact]
    public async Task Fault_NetlinkDirect_ServerStoppedGracefully_ServesAgainAndNoAcknowledgedWriteLost()
    {
        var (run, row) = await CaseAsync("S7", "Netlink");
        Expect.Equal(run, row.Line, "verify_failures", 0);
        Expect.Equal(run, row.Line, "size_after", FaultScenario.ExportBytes);
    }

    [Fact]
    public async Task Faults_AfterAllScenarios_DaemonStopsCleanly()
    {
        var run = await vm.RunAsync(FaultScenario.Spec);
        var r = run.One("faults-stop");
        Expect.Equal(run, r, "exit_rc", 0);
        output.WriteLine(FaultReport.Parse(run.Output).ToMarkdown());
    }
}

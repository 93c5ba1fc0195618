using Xunit.Abstractions;

namespace Vm.Tests;

/// <summary>
/// The VM run of tests/vm/scenarios/faults.sh with every mapping <c>"Relay": true</c> (a copy of the script that sets
/// RELAY=1 on its first line; tests/vm/faults.sh --relay runs the same by hand), CI counts.
/// </summary>
internal static class FaultRelayScenario
{
    public static ScenarioSpec Spec { get; } =
        new(ScenarioCount.Copy("faults.sh", "RELAY=1", "relay"), ["nbdkit"], true, 900) { NeedsTools = true };

    /// <summary>
    /// Issue 6's goal: I/O resumes within 1 s of the server accepting again. The relay reaches it where it hides the
    /// loss (it reconnects at once, then every 250 ms, and resends what was in flight). Measured (two CI-count runs,
    /// TCG, Timeout 5 s, host load average 7–15): S1 Netlink 289–869 ms, Ioctl 107–336 ms; S3 cut/reset 96–285 ms,
    /// stall 7 s 135–235 ms; S2 (no loss: the driver's own timeout) 79–215 ms. Without the relay S1 and S3 cut stall
    /// 3.3–5.0 s. The full counts (tests/vm/faults.sh --relay --full) gave one S1 round of 20 at 1090 ms.
    /// </summary>
    public const long StallGoalMs = 1000;

    /// <summary>S3's faults that are shorter than the Timeout (the fourth, stall Timeout + 2 s, is not).</summary>
    public static readonly string[] S3FaultsShorterThanTimeout = ["cut", "reset", "stall2"];
}

/// <summary>
/// The fault suite (see <see cref="FaultTests"/>) with the relay: the driver's socket is one end of a socket pair, and
/// the daemon hides a lost server connection shorter than Timeout by reconnecting and resending. Every case passes the
/// checks of <see cref="FaultCase"/> (served again after every fault, the data verifies, S4's other disk refused); on
/// top, a lost connection (S1 server kill, S3 cut and reset) must be hidden by the relay itself (its log says
/// reconnected, never gave up) within 1 s of the server accepting again, for Ioctl too, without an I/O error. What the
/// relay cannot hide is asserted as without it: an outage beyond Timeout (S2, S3 stall 7 s: Ioctl fails I/O), the
/// export coming back as another disk (S4: the relay gives up at once, the mapping's reconnect refuses it) and a
/// daemon restart (S5/S6: the relay lives in the daemon; Netlink holds I/O for the whole cold start, measured 21–34 s
/// under TCG against ~0.1 s without the relay, whose driver keeps its TCP socket to the server).
/// </summary>
[Collection(VmCollection.Name)]
public sealed class FaultRelayTests(VmFixture vm, ITestOutputHelper output)
{
    private Task<(VmRun Run, FaultRow Row)> CaseAsync(string scenario, string iface) =>
        FaultCase.CheckAsync(vm, FaultRelayScenario.Spec, "1", scenario, iface, output);

    [Theory]
    [InlineData("S1")]
    [InlineData("S2")]
    [InlineData("S3")]
    [InlineData("S4")]
    [InlineData("S5")]
    [InlineData("S6")]
    [InlineData("S7")]
    public async Task FaultRelay_Netlink_ApplicationSeesNoErrorAndServerLossIsHiddenWithinOneSecond(string scenario)
    {
        var (run, row) = await CaseAsync(scenario, "Netlink");
        Expect.Equal(run, row.Line, "app_io_errors", 0);
        Expect.Equal(run, row.Line, "kernel_io_errors", 0);
        Expect.Equal(run, row.Line, "verify_failures", 0);
        switch (scenario)
        {
            case "S1" or "S3" or "S7":
                AssertRelayHidLosses(run, row, scenario);
                Expect.That(run, row.Line, row.MaxStallAfterBackMs <= FaultRelayScenario.StallGoalMs,
                    $"I/O stalled {row.MaxStallAfterBackMs} ms after the server accepted again (goal: {FaultRelayScenario.StallGoalMs} ms)");
                break;
            case "S2":
                // No connection lost (a stopped server keeps its socket): the driver's timeout hands over to the
                // mapping's reconnect, which completes as soon as the server runs again.
                Expect.That(run, row.Line, row.MaxStallAfterBackMs <= FaultRelayScenario.StallGoalMs,
                    $"I/O stalled {row.MaxStallAfterBackMs} ms after SIGCONT (goal: {FaultRelayScenario.StallGoalMs} ms)");
                break;
            case "S4":
                Expect.That(run, row.Line, row.Line.Long("relay_gave_up") >= 1, "the relay did not give up on the export of another size");
                Expect.Equal(run, row.Line, "sizes_during", FaultScenario.ExportBytes);
                Expect.That(run, row.Line, row.MaxStallAfterBackMs <= FaultScenario.NetlinkStallBoundMs,
                    $"I/O stalled {row.MaxStallAfterBackMs} ms after the right export was back (bound: Timeout + 2 s)");
                break;
            case "S5" or "S6":
                // The kernel held I/O while no daemon ran, the new daemon adopted the device, and its relay hid the
                // server kill that followed.
                Expect.Equal(run, row.Line, "device_while_down", "configured");
                Expect.Equal(run, row.Line, "adopted", "yes");
                Expect.That(run, row.Line, row.Line.Long("relay_reconnected") >= 1, "the new daemon's relay never reconnected after the server kill");
                Expect.Equal(run, row.Line, "relay_gave_up", 0);
                break;
        }
    }

    [Theory]
    [InlineData("S1")]
    [InlineData("S2")]
    [InlineData("S3")]
    [InlineData("S4")]
    [InlineData("S5")]
    [InlineData("S7")]
    public async Task FaultRelay_Ioctl_ServesAgainAndOutageShorterThanTimeoutFailsNoIo(string scenario)
    {
        var (run, row) = await CaseAsync(scenario, "Ioctl");
        Expect.Equal(run, row.Line, "verify_failures_recent", 0);
        switch (scenario)
        {
            case "S1" or "S7":
                // Server down 1..3 s, Timeout 5 s: without the relay every kill failed I/O on an ioctl device.
                AssertRelayHidLosses(run, row, scenario);
                Expect.Equal(run, row.Line, "app_io_errors", 0);
                Expect.Equal(run, row.Line, "kernel_io_errors", 0);
                Expect.Equal(run, row.Line, "verify_failures", 0);
                Expect.That(run, row.Line, row.MaxStallAfterBackMs <= FaultRelayScenario.StallGoalMs,
                    $"I/O stalled {row.MaxStallAfterBackMs} ms after the server accepted again (goal: {FaultRelayScenario.StallGoalMs} ms)");
                break;
            case "S3":
                AssertRelayHidLosses(run, row, scenario);
                foreach (var fault in FaultReport.Rounds(run.Output, scenario, "Ioctl")
                             .Where(n => FaultRelayScenario.S3FaultsShorterThanTimeout.Contains(n["fault"])))
                {
                    Expect.That(run, row.Line, fault.Long("app_io_errors") == 0,
                        $"an outage shorter than Timeout failed I/O: NOTE {fault.Raw}");
                    Expect.That(run, row.Line, fault.Long("stall_after_back_ms") <= FaultRelayScenario.StallGoalMs,
                        $"I/O stalled longer than {FaultRelayScenario.StallGoalMs} ms after the fault: NOTE {fault.Raw}");
                }

                break;
            case "S4":
                Expect.That(run, row.Line, row.Line.Long("relay_gave_up") >= 1, "the relay did not give up on the export of another size");
                foreach (var size in row.Line["sizes_during"].Split(','))
                {
                    Expect.That(run, row.Line, size is "0" || size == FaultScenario.ExportBytes.ToString(System.Globalization.CultureInfo.InvariantCulture),
                        $"device size {size} while the server offered {FaultScenario.WrongExportBytes} bytes");
                }

                break;
        }
    }

    [Fact]
    public async Task FaultsRelay_AfterAllScenarios_DaemonStopsCleanly()
    {
        var run = await vm.RunAsync(FaultRelayScenario.Spec);
        var r = run.One("faults-stop");
        Expect.Equal(run, r, "exit_rc", 0);
        output.WriteLine(FaultReport.Parse(run.Output).ToMarkdown());
    }

    /// <summary>Every lost connection of the case came back through the relay: S1 one per kill, S3 the cut and the
    /// reset of each round; none ended in a give-up (which would have left it to the mapping's reconnect).</summary>
    private static void AssertRelayHidLosses(VmRun run, FaultRow row, string scenario)
    {
        var expected = scenario == "S3" ? 2 * row.Rounds : row.Rounds;
        Expect.That(run, row.Line, row.Line.Long("relay_reconnected") >= expected,
            $"the relay reconnected {row.Line["relay_reconnected"]} times, expected at least {expected}");
        Expect.Equal(run, row.Line, "relay_gave_up", 0);
        if (scenario == "S7")
        {
            // The graceful stop was seen as such: nbdkit answered NBD_ESHUTDOWN, and that went to no application.
            Expect.That(run, row.Line, row.Line.Long("relay_eshutdown") >= 1, "no NBD_ESHUTDOWN reached the relay: the scenario did not test it");
        }
    }
}

using Xunit.Abstractions;

namespace Vm.Tests;

/// <summary>
/// One scenario × interface of a faults.sh run (FaultTests: the daemon as configured by default; FaultRelayTests:
/// every mapping with Relay on), with the checks every case passes whatever the configuration: the tools were there,
/// the load really ran and read back what it wrote, the daemon lived, and the device served again after every fault.
/// </summary>
internal static class FaultCase
{
    /// <summary>The case's row after the common checks; the run's table and the case's per-fault notes go to
    /// <paramref name="output"/>. <paramref name="relay"/> is the <c>relay=</c> value every row of the run must carry
    /// ("0" or "1"), so a run with the wrong configuration cannot pass for the other.</summary>
    public static async Task<(VmRun Run, FaultRow Row)> CheckAsync(
        VmFixture vm, ScenarioSpec spec, string relay, string scenario, string iface, ITestOutputHelper output)
    {
        var run = await vm.RunAsync(spec);
        var tools = run.One("faults-tools");
        foreach (var tool in new[] { "nbdkit", "daemon", "nbd_verify", "fault_proxy" })
        {
            Expect.Equal(run, tools, tool, "yes");
        }

        var start = run.One("faults-start");
        Expect.Equal(run, start, "sizes", string.Join(',', Enumerable.Repeat(FaultScenario.ExportBytes, 4)));
        var line = run.One(FaultReport.ResultName, ("scenario", scenario), ("interface", iface));
        output.WriteLine(FaultReport.Parse(run.Output).ToMarkdown());
        foreach (var note in FaultReport.Rounds(run.Output, scenario, iface))
        {
            output.WriteLine("NOTE " + note.Raw);
        }

        var row = FaultRow.From(line);
        Expect.Equal(run, line, "relay", relay);
        // The load really ran, with O_DIRECT, and its final pass read back what it wrote.
        Expect.Equal(run, line, "direct", "yes");
        Expect.That(run, line, line.Long("writes") >= 100, "the verifier hardly wrote");
        Expect.That(run, line, line.Long("final_checked") >= 100, "the final pass checked hardly any block");
        Expect.Equal(run, line, "daemon_alive", "yes");
        Expect.Equal(run, line, "size_after", FaultScenario.ExportBytes);
        // Served again after every fault.
        Expect.Equal(run, line, "served_again", "yes");
        Expect.Equal(run, line, "served_rounds", row.Rounds * FaultScenario.FaultsPerRound(scenario));
        if (scenario == "S4")
        {
            Expect.Equal(run, line, "resized_to_wrong", "no");
            Expect.That(run, line, line.Long("refusals_logged") >= 1,
                $"the daemon log never said 'export size changed from {FaultScenario.ExportBytes} to {FaultScenario.WrongExportBytes}'");
        }

        return (run, row);
    }
}

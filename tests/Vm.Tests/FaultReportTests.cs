namespace Vm.Tests;

/// <summary>The fault suite's table parser, without a VM.</summary>
public sealed class FaultReportTests
{
    private const string Console =
        "NOTE fault-round scenario=S1 interface=Netlink round=1 down_s=1\n" +
        "NOTE fault-round scenario=S1 interface=Ioctl round=1 down_s=1 stall_after_back_ms=12 app_io_errors=0\n" +
        "NOTE fault-round scenario=S1 interface=Netlink round=2 down_s=2 stall_after_back_ms=2500 app_io_errors=0\n" +
        "\u001b[2JRESULT fault scenario=S1 interface=Netlink relay=0 device=nbd0 rounds=3 app_io_errors=0 kernel_io_errors=0 " +
        "verify_failures=0 max_stall_after_back_ms=3574 max_gap_ms=5040 served_again=yes\n" +
        "RESULT faults-start daemon_alive=yes\n" +
        "RESULT fault scenario=S1 interface=Ioctl relay=1 device=nbd2 rounds=3 app_io_errors=17 kernel_io_errors=1 " +
        "verify_failures=0 max_stall_after_back_ms=422 max_gap_ms=1874 served_again=no extra=1\n";

    [Fact]
    public void Parse_Console_OneRowPerFaultLineInOrder()
    {
        var report = FaultReport.Parse(Console);
        Assert.Equal(2, report.Rows.Count);
        var io = report.Row("S1", "Ioctl");
        Assert.Equal(17, io.AppIoErrors);
        Assert.Equal(1, io.KernelIoErrors);
        Assert.Equal(422, io.MaxStallAfterBackMs);
        Assert.Equal("no", io.ServedAgain);
        Assert.Equal("nbd2", io.Line["device"]);
        Assert.Equal("1", io.Relay);
        Assert.Equal("Netlink", report.Rows[0].Interface);
    }

    [Fact]
    public void ToMarkdown_TwoRows_HeaderSeparatorAndOneLineEach()
    {
        var lines = FaultReport.Parse(Console).ToMarkdown().TrimEnd('\n').Split('\n');
        Assert.Equal(4, lines.Length);
        Assert.StartsWith("| scenario | interface |", lines[0], StringComparison.Ordinal);
        Assert.Equal("|---|---|---|---|---|---|---|---|---|---|", lines[1]);
        Assert.Equal("| S1 | Netlink | 0 | 3 | 0 | 0 | 0 | 3574 | 5040 | yes |", lines[2]);
        Assert.Equal("| S1 | Ioctl | 1 | 3 | 17 | 1 | 0 | 422 | 1874 | no |", lines[3]);
    }

    [Fact]
    public void Parse_LineMissingAColumn_ThrowsNamingTheKey()
    {
        var e = Assert.Throws<KeyNotFoundException>(() =>
            FaultReport.Parse("RESULT fault scenario=S2 interface=Netlink relay=0 rounds=1 app_io_errors=0\n"));
        Assert.Contains("kernel_io_errors", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Parse_LineWithoutRelay_ThrowsNamingRelay()
    {
        var e = Assert.Throws<KeyNotFoundException>(() => FaultReport.Parse(
            "RESULT fault scenario=S2 interface=Netlink rounds=1 app_io_errors=0 kernel_io_errors=0 verify_failures=0 " +
            "max_stall_after_back_ms=1 max_gap_ms=1 served_again=yes\n"));
        Assert.Contains("'relay'", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Parse_NonNumericCount_Throws() =>
        Assert.Throws<FormatException>(() => FaultReport.Parse(
            "RESULT fault scenario=S2 interface=Netlink relay=0 rounds=x app_io_errors=0 kernel_io_errors=0 verify_failures=0 " +
            "max_stall_after_back_ms=1 max_gap_ms=1 served_again=yes\n"));

    [Fact]
    public void Rounds_Console_TheCasesNotesInOrder()
    {
        var rounds = FaultReport.Rounds(Console, "S1", "Netlink");
        Assert.Equal(["1", "2"], rounds.Select(r => r["round"]));
        Assert.Equal(2500, rounds[1].Long("stall_after_back_ms"));
        Assert.Empty(FaultReport.Rounds(Console, "S2", "Netlink"));
    }

    [Fact]
    public void Row_Absent_ThrowsNamingScenarioAndInterface()
    {
        var e = Assert.Throws<KeyNotFoundException>(() => FaultReport.Parse(Console).Row("S4", "Netlink"));
        Assert.Contains("scenario=S4 interface=Netlink", e.Message, StringComparison.Ordinal);
    }
}

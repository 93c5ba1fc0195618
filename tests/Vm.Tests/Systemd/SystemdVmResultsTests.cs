namespace Vm.Tests.Systemd;

public sealed class SystemdVmResultsTests
{
    [Fact]
    public void Parse_SerialLinesWithCarriageReturnsAndKernelNoise_KeepsKeysAndValues()
    {
        const string serial = "RESULT systemd boot_uptime_s=12.71\r\n"
            + "[   77.766036] reboot: Power down\r\n"
            + "[    7.9] nbd0: detected capacity change RESULT systemd harness_StatusText=Harness: 1 mapping ready = yes\r\n"
            + "RESULT systemd empty=\n"
            + "RESULTsystemd broken=1\n";

        var results = SystemdVmResults.Parse(serial).Values;

        Assert.Equal("12.71", results["boot_uptime_s"]);
        Assert.Equal("Harness: 1 mapping ready = yes", results["harness_StatusText"]);
        Assert.Equal(string.Empty, results["empty"]);
        Assert.False(results.ContainsKey("broken"));
        Assert.Equal(3, results.Count);
    }

    [Fact]
    public void Parse_KeyPrintedTwice_LastValueWins() =>
        Assert.Equal("2", SystemdVmResults.Parse("RESULT systemd k=1\nRESULT systemd k=2\n").Values["k"]);
}

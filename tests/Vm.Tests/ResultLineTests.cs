namespace Vm.Tests;

/// <summary>The console parser, without a VM.</summary>
public sealed class ResultLineTests
{
    [Fact]
    public void TryParse_LineWithTerminalNoise_ParsesScenarioAndValues()
    {
        Assert.True(ResultLine.TryParse("\u001bc\u001b[2JRESULT map server=qemu-nbd mode=ioctl size=67108864", out var r));
        Assert.Equal("map", r!.Scenario);
        Assert.Equal("qemu-nbd", r["server"]);
        Assert.Equal(67108864, r.Long("size"));
        Assert.True(r.Matches(("mode", "ioctl")));
        Assert.False(r.Matches(("mode", "netlink")));
    }

    [Theory]
    [InlineData("NOTE something")]
    [InlineData("RESULT ")]
    [InlineData("RESULT key=value")]
    [InlineData("RESULT map broken-token")]
    public void TryParse_NotAResult_ReturnsFalse(string line) => Assert.False(ResultLine.TryParse(line, out _));

    [Fact]
    public void Indexer_MissingKey_ThrowsWithTheLine()
    {
        Assert.True(ResultLine.TryParse("RESULT stop mode=ioctl", out var r));
        var e = Assert.Throws<KeyNotFoundException>(() => r!["exit_rc"]);
        Assert.Contains("RESULT stop mode=ioctl", e.Message, StringComparison.Ordinal);
    }
}

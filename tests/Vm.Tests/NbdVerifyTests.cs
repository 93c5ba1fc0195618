using System.Globalization;

namespace Vm.Tests;

/// <summary>
/// tests/vm/tools/nbd-verify on a plain file on the host (no VM): a clean run finds nothing, a corrupted or
/// misplaced block is reported as that block, a failing write (EFBIG past `ulimit -f`, a real errno from the
/// kernel without a loop device) is counted, and a pause of the process shows up as a completion gap.
/// </summary>
public sealed class NbdVerifyTests : IDisposable
{
    private const int Block = 4096;
    private readonly string _dir = Directory.CreateTempSubdirectory("nbd-verify-test-").FullName;

    private string Path(string name) => System.IO.Path.Combine(_dir, name);

    private async Task<(ResultLine Report, string Events)> RunAsync(string shell)
    {
        var tools = await VmTools.BuildAsync(new VmFixture().RepoRoot);
        var script = $"set -e\ncd '{_dir}'\nV='{System.IO.Path.Combine(tools, "nbd-verify")}'\n{shell}";
        var (code, output) = await VmFixture.ExecAsync("bash", ["-c", script], TimeSpan.FromMinutes(2));
        Assert.True(code == 0, $"nbd-verify script failed (exit {code}):\n{output}");
        var last = output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Last(l => l.StartsWith("writes=", StringComparison.Ordinal));
        Assert.True(ResultLine.TryParse("RESULT verify " + last, out var report), last);
        var events = File.Exists(Path("ev")) ? await File.ReadAllTextAsync(Path("ev")) : "";
        return (report!, events);
    }

    // One second of load on an 8 MiB file, stopped by the stop file; the generation map saved to `map`.
    private const string CleanRun =
        "truncate -s 8M f\n(sleep 1; touch stop) &\n" +
        "\"$V\" run --device f --region-mib 8 --stop-file stop --events ev --map-out map\nwait\n";

    [Fact]
    public async Task Run_PlainFile_WritesReadsBackAndVerifiesEveryBlockWithoutFailure()
    {
        var (r, events) = await RunAsync(CleanRun);
        Assert.True(r.Long("writes") > 50, r.Raw);
        Assert.True(r.Long("reads") > 10, r.Raw);
        Assert.True(r.Long("final_checked") > 50, r.Raw);
        Assert.Equal(0, r.Long("verify_failures"));
        Assert.Equal(0, r.Long("write_errors"));
        Assert.Equal(0, r.Long("read_errors"));
        Assert.DoesNotContain("verify_fail", events, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("byte", "crc")]     // one payload byte changed in place
    [InlineData("moved", "index")]  // another block's (valid) content written over it
    public async Task Check_OneBlockDamaged_ReportsExactlyThatBlock(string damage, string reason)
    {
        await RunAsync(CleanRun);
        var written = (await File.ReadAllLinesAsync(Path("map"))).Skip(1).Select(l => long.Parse(l.Split(' ')[0], CultureInfo.InvariantCulture)).ToList();
        long victim = written[0], donor = written[1];
        await using (var f = new FileStream(Path("f"), FileMode.Open, FileAccess.ReadWrite))
        {
            if (damage == "byte")
            {
                f.Position = (victim * Block) + 100;
                int b = f.ReadByte();
                f.Position = (victim * Block) + 100;
                f.WriteByte((byte)(b ^ 0x5a));
            }
            else
            {
                var buf = new byte[Block];
                f.Position = donor * Block;
                f.ReadExactly(buf);
                f.Position = victim * Block;
                f.Write(buf);
            }
        }

        File.Delete(Path("ev"));
        var (r, events) = await RunAsync("\"$V\" check --device f --map map --events ev\n");
        Assert.Equal(1, r.Long("verify_failures"));
        Assert.Equal(written.Count, r.Long("final_checked"));
        Assert.Contains($"verify_fail phase=final block={victim} ", events, StringComparison.Ordinal);
        Assert.Contains($"reason={reason} ", events, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Run_WritesPastFileSizeLimit_CountsEachFailedWriteWithItsErrno()
    {
        // ulimit -f 1024 = 1 MiB: writes to 7/8 of the 8 MiB region fail with EFBIG (SIGXFSZ is ignored). The file
        // first gets 2 s of a run with the same seed, so the blocks whose writes fail hold an earlier run's valid
        // blocks, with generations this run never reaches: still not corruption (a verifier bug found in the VM).
        var (r, events) = await RunAsync(
            "truncate -s 8M f\n(sleep 2; touch stop) &\n\"$V\" run --device f --region-mib 8 --stop-file stop\nwait\nrm stop\n" +
            "(sleep 0.5; touch stop) &\n" +
            "(ulimit -f 1024; exec \"$V\" run --device f --region-mib 8 --stop-file stop --events ev --final-retry-s 0)\nwait\n");
        Assert.True(r.Long("write_errors") > 0, r.Raw);
        Assert.Contains("error op=write ", events, StringComparison.Ordinal);
        Assert.Contains("errno=EFBIG", events, StringComparison.Ordinal);
        Assert.True(r.Long("final_checked") > 0, r.Raw);
        // a failed write is not data loss: no block may be reported corrupt for it
        Assert.Equal(0, r.Long("verify_failures"));
    }

    [Fact]
    public async Task Run_ProcessStoppedFor300Ms_LogsACompletionGapOfAtLeastThat()
    {
        var (r, events) = await RunAsync(
            "truncate -s 8M f\n\"$V\" run --device f --region-mib 8 --stop-file stop --events ev &\np=$!\n" +
            "sleep 0.5; kill -STOP $p; sleep 0.3; kill -CONT $p; sleep 0.3; touch stop; wait $p\n");
        Assert.True(r.Long("max_gap_ms") >= 300, r.Raw);
        var gap = events.Split('\n').Where(l => l.StartsWith("gap ", StringComparison.Ordinal))
            .Select(l => double.Parse(l.Split(' ').Single(t => t.StartsWith("ms=", StringComparison.Ordinal))[3..], CultureInfo.InvariantCulture))
            .DefaultIfEmpty(0).Max();
        Assert.True(gap >= 300, events);
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);
}

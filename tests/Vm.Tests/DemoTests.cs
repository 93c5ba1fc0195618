using System.Diagnostics;

namespace Vm.Tests;

/// <summary>
/// The README's first command, run as a user runs it: <c>deploy/demo.sh</c> (here, on a host without the nbd driver,
/// it takes the VM path). Asserts on what it prints, step by step.
/// </summary>
[Collection(VmCollection.Name)]
public sealed class DemoTests(VmFixture vm)
{
    [Fact]
    public async Task Demo_FreshHost_MakesExt4ReadsFileBackAndFreesDevice()
    {
        var start = new ProcessStartInfo("bash", [Path.Combine(vm.RepoRoot, "deploy", "demo.sh")])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        using var demo = Process.Start(start)!;
        var stdout = demo.StandardOutput.ReadToEndAsync();
        var stderr = demo.StandardError.ReadToEndAsync();
        using var limit = new CancellationTokenSource(TimeSpan.FromMinutes(10));
        await demo.WaitForExitAsync(limit.Token);
        var output = await stdout + await stderr;

        Assert.True(demo.ExitCode == 0, $"demo.sh exited {demo.ExitCode}:\n{output}");
        Assert.Contains("is connected: 524288 sectors, block size 4096", output, StringComparison.Ordinal);
        Assert.Contains("remounted and read it back: sha256 matches", output, StringComparison.Ordinal);
        Assert.Contains("daemon exited with 0; /dev/nbd0 is free again (size 0, no pid)", output, StringComparison.Ordinal);
        Assert.Contains("demo: OK", output, StringComparison.Ordinal);
    }
}

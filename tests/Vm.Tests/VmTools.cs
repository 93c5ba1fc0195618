using Xunit.Sdk;

namespace Vm.Tests;

/// <summary>
/// The VM tier's C tools (tests/vm/tools: nbd-verify, fault-proxy, thread-signal), built static by tools/build.sh into the test
/// output folder and copied into the VM with <c>--add</c>. gcc or static glibc missing is a failure with the reason.
/// </summary>
internal static class VmTools
{
    public static readonly string[] Names = ["nbd-verify", "fault-proxy", "thread-signal"];

    public static async Task<string> BuildAsync(string repoRoot)
    {
        var outDir = Path.Combine(AppContext.BaseDirectory, "vm-tools");
        var (code, output) = await VmFixture.ExecAsync(
            "bash", [Path.Combine(repoRoot, "tests", "vm", "tools", "build.sh"), outDir], TimeSpan.FromMinutes(5));
        if (code != 0 || Names.Any(n => !File.Exists(Path.Combine(outDir, n))))
        {
            throw new XunitException($"tests/vm/tools/build.sh failed (exit {code}):\n{output}");
        }

        return outDir;
    }

    /// <summary>run-vm.sh arguments putting every tool on the VM's PATH.</summary>
    public static IEnumerable<string> AddArguments(string outDir) =>
        Names.SelectMany(n => new[] { "--add", $"{Path.Combine(outDir, n)}:/usr/local/bin/{n}" });
}

using System.Globalization;

namespace Vm.Tests;

/// <summary>
/// A scenario whose round count a host environment variable may change (CI runs the default, the full count is one
/// variable away). The VM has no environment to pass it through, so another count runs a copy of the script with
/// the scenario's own variable assigned on its first line.
/// </summary>
internal static class ScenarioCount
{
    /// <summary>The count from <paramref name="environmentVariable"/>, or <paramref name="defaultCount"/> when unset;
    /// anything but a whole number from 1 to <paramref name="max"/> throws, naming the variable.</summary>
    public static int Read(string environmentVariable, int defaultCount, int max)
    {
        var text = Environment.GetEnvironmentVariable(environmentVariable);
        if (string.IsNullOrEmpty(text))
        {
            return defaultCount;
        }

        return int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var n) && n >= 1 && n <= max
            ? n
            : throw new InvalidOperationException($"{environmentVariable}={text}: expected a whole number from 1 to {max}");
    }

    /// <summary>The script's name for the default count; otherwise an absolute path to a copy that sets
    /// <paramref name="scriptVariable"/> (VmFixture combines the name with tests/vm/scenarios, which keeps an absolute
    /// path as it is).</summary>
    public static string Script(string name, string scriptVariable, int count, int defaultCount) =>
        count == defaultCount
            ? name
            : Copy(name, $"{scriptVariable}={count}", count.ToString(CultureInfo.InvariantCulture));

    /// <summary>An absolute path to a copy of scenario <paramref name="name"/> with <paramref name="firstLine"/> (a
    /// variable assignment the script leaves alone when it is already set) put before it. The copy's name ends in
    /// <paramref name="suffix"/>, so each variant is its own VM run in VmFixture and its own console under
    /// artifacts/vm-runs.</summary>
    public static string Copy(string name, string firstLine, string suffix)
    {
        var source = Path.Combine(VmFixture.FindRepoRoot(AppContext.BaseDirectory), "tests", "vm", "scenarios", name);
        var copy = Path.Combine(Path.GetTempPath(), $"nbdvm-{Path.GetFileNameWithoutExtension(name)}-{suffix}.sh");
        File.WriteAllText(copy, firstLine + "\n" + File.ReadAllText(source));
        return copy;
    }
}

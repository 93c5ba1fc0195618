namespace Vm.Tests;

/// <summary>Assertions on one RESULT line that show the line and the daemon's log when they fail.</summary>
internal static class Expect
{
    public static void Equal(VmRun run, ResultLine line, string key, string expected) =>
        Assert.True(line[key] == expected, $"{key}: expected {expected}, measured {line[key]}\n{run.Context(line)}");

    public static void Equal(VmRun run, ResultLine line, string key, long expected) =>
        Assert.True(line.Long(key) == expected, $"{key}: expected {expected}, measured {line[key]}\n{run.Context(line)}");

    public static void That(VmRun run, ResultLine line, bool condition, string what) =>
        Assert.True(condition, $"{what}\n{run.Context(line)}");
}

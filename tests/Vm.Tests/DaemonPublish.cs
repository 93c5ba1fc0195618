namespace Vm.Tests;

/// <summary>The daemon published once per test process (<see cref="SelfContainedPublish"/>).</summary>
internal static class DaemonPublish
{
    /// <summary>The published folder (it holds <c>nbd-daemon</c>), or why publishing failed.</summary>
    public static Task<(string? Directory, string? Error)> GetAsync() => SelfContainedPublish.GetAsync("src/NbdDaemon", "nbd-daemon", "nbd-daemon");
}

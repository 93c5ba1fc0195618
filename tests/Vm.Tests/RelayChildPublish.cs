namespace Vm.Tests;

/// <summary>
/// tests/Nbd.RelayChild published once per test process (<see cref="SelfContainedPublish"/>) into a folder named
/// Nbd.RelayChild, so that run-vm.sh --app puts it at /opt/Nbd.RelayChild.
/// </summary>
internal static class RelayChildPublish
{
    /// <summary>The published folder (it holds <c>Nbd.RelayChild</c>), or why publishing failed.</summary>
    public static Task<(string? Directory, string? Error)> GetAsync() => SelfContainedPublish.GetAsync("tests/Nbd.RelayChild", "Nbd.RelayChild", "Nbd.RelayChild");
}

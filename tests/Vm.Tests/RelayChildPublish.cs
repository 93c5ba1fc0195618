namespace Vm.Tests;

/// <summary>
/// tests/Nbd.RelayChild published once per test process (Release, self-contained, linux-x64) into a folder named
/// Nbd.RelayChild, so that run-vm.sh --app puts it at /opt/Nbd.RelayChild. Removed when the test process exits.
/// </summary>
internal static class RelayChildPublish
{
    private static readonly Lazy<Task<(string? Directory, string? Error)>> s_publish = new(PublishAsync);

    /// <summary>The published folder (it holds <c>Nbd.RelayChild</c>), or why publishing failed.</summary>
    public static Task<(string? Directory, string? Error)> GetAsync() => s_publish.Value;

    private static async Task<(string? Directory, string? Error)> PublishAsync()
    {
        string repo = VmFixture.FindRepoRoot(AppContext.BaseDirectory);
        string parent = Path.Combine(Path.GetTempPath(), "nbd-relaychild-vm-publish-" + Guid.NewGuid().ToString("N"));
        string dir = Path.Combine(parent, "Nbd.RelayChild");
        AppDomain.CurrentDomain.ProcessExit += (_, _) =>
        {
            if (Directory.Exists(parent))
            {
                Directory.Delete(parent, recursive: true);
            }
        };
        var (code, output) = await VmFixture.ExecAsync(
            "dotnet",
            ["publish", Path.Combine(repo, "tests", "Nbd.RelayChild"), "-c", "Release", "-r", "linux-x64", "--self-contained", "-o", dir, "-nologo"],
            TimeSpan.FromMinutes(10)).ConfigureAwait(false);
        if (code != 0 || !File.Exists(Path.Combine(dir, "Nbd.RelayChild")))
        {
            string tail = string.Join('\n', output.Split('\n').TakeLast(30));
            return (null, $"dotnet publish of tests/Nbd.RelayChild failed (exit {code}):\n{tail}");
        }

        return (dir, null);
    }
}

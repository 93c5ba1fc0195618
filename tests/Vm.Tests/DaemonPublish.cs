namespace Vm.Tests;

/// <summary>
/// The daemon published once per test process (Release, self-contained, linux-x64) for every fixture that boots a
/// VM with it: the kernel-tier scenarios, the systemd tier and its restart scenario. Each publish took about a
/// minute under CI load; the fixtures run one after another (TestOrdering), and each VM copies the folder in.
/// The folder is removed when the test process exits.
/// </summary>
internal static class DaemonPublish
{
    private static readonly Lazy<Task<(string? Directory, string? Error)>> s_publish = new(PublishAsync);

    /// <summary>The published folder (it holds <c>nbd-daemon</c>), or why publishing failed.</summary>
    public static Task<(string? Directory, string? Error)> GetAsync() => s_publish.Value;

    private static async Task<(string? Directory, string? Error)> PublishAsync()
    {
        string repo = VmFixture.FindRepoRoot(AppContext.BaseDirectory);
        string dir = Path.Combine(Path.GetTempPath(), "nbd-daemon-vm-publish-" + Guid.NewGuid().ToString("N"));
        AppDomain.CurrentDomain.ProcessExit += (_, _) =>
        {
            if (Directory.Exists(dir))
            {
                Directory.Delete(dir, recursive: true);
            }
        };
        var (code, output) = await VmFixture.ExecAsync(
            "dotnet",
            ["publish", Path.Combine(repo, "src", "NbdDaemon"), "-c", "Release", "-r", "linux-x64", "--self-contained", "-o", dir, "-nologo"],
            TimeSpan.FromMinutes(10)).ConfigureAwait(false);
        if (code != 0 || !File.Exists(Path.Combine(dir, "nbd-daemon")))
        {
            string tail = string.Join('\n', output.Split('\n').TakeLast(30));
            return (null, $"dotnet publish of src/NbdDaemon failed (exit {code}):\n{tail}");
        }

        return (dir, null);
    }
}

using System.Collections.Concurrent;

namespace Vm.Tests;

/// <summary>
/// A project of this repository published once per test process (Release, self-contained, linux-x64) for every fixture
/// that boots a VM with it: the daemon (<see cref="DaemonPublish"/>) and tests/Nbd.RelayChild. Each publish took about a
/// minute under CI load; the fixtures run one after another (TestOrdering), and each VM copies the folder in. The
/// folders are removed when the test process exits.
/// </summary>
internal static class SelfContainedPublish
{
    private static readonly ConcurrentDictionary<string, Lazy<Task<(string? Directory, string? Error)>>> s_publishes = new();

    /// <summary>
    /// The folder <paramref name="folderName"/> that <paramref name="project"/> (relative to the repository) was published
    /// into, holding <paramref name="executable"/>, or why publishing failed.
    /// </summary>
    public static Task<(string? Directory, string? Error)> GetAsync(string project, string folderName, string executable) =>
        s_publishes.GetOrAdd(project, _ => new Lazy<Task<(string?, string?)>>(() => PublishAsync(project, folderName, executable))).Value;

    private static async Task<(string? Directory, string? Error)> PublishAsync(string project, string folderName, string executable)
    {
        string repo = VmFixture.FindRepoRoot(AppContext.BaseDirectory);
        string parent = Path.Combine(Path.GetTempPath(), "nbd-vm-publish-" + Guid.NewGuid().ToString("N"));
        string dir = Path.Combine(parent, folderName);
        AppDomain.CurrentDomain.ProcessExit += (_, _) =>
        {
            if (Directory.Exists(parent))
            {
                Directory.Delete(parent, recursive: true);
            }
        };
        var (code, output) = await VmFixture.ExecAsync(
            "dotnet",
            ["publish", Path.Combine(repo, project), "-c", "Release", "-r", "linux-x64", "--self-contained", "-o", dir, "-nologo"],
            TimeSpan.FromMinutes(10)).ConfigureAwait(false);
        if (code != 0 || !File.Exists(Path.Combine(dir, executable)))
        {
            string tail = string.Join('\n', output.Split('\n').TakeLast(30));
            return (null, $"dotnet publish of {project} failed (exit {code}):\n{tail}");
        }

        return (dir, null);
    }
}

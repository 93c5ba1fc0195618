using System.Diagnostics;
using System.Globalization;
using System.Text;
using Xunit.Abstractions;
using Xunit.Sdk;

namespace Vm.Tests.Systemd;

/// <summary>
/// Boots the full tier once for the whole collection: publishes the daemon, runs
/// <c>tests/vm/systemd/run.sh</c> (debootstrapped Debian, real systemd + journald, the repo's deploy/install.sh)
/// with the daemon scenario, and keeps the parsed RESULT lines for every test to assert on.
/// Missing tools or a failed boot are recorded, never skipped: every test then fails with the reason.
/// </summary>
public sealed class SystemdVmFixture : IAsyncLifetime
{
    // A quiet machine runs the whole scenario in ~2 min; the margin is for a host whose cores are shared (TCG
    // slows down in proportion), and every step inside the VM has its own bound.
    private static readonly TimeSpan VmTimeout = TimeSpan.FromSeconds(600);
    private static readonly TimeSpan PublishTimeout = TimeSpan.FromMinutes(8);
    private static readonly TimeSpan RootfsTimeout = TimeSpan.FromMinutes(15);
    private static readonly string[] RequiredTools = ["qemu-system-x86_64", "debootstrap", "cpio", "zstd", "chroot", "tar", "bash", "timeout"];

    private readonly IMessageSink _sink;
    private readonly StringBuilder _log = new();
    private SystemdVmResults _results = SystemdVmResults.Parse(string.Empty);

    public SystemdVmFixture(IMessageSink sink) => _sink = sink;

    /// <summary>Why the VM produced nothing to assert on, when it did not.</summary>
    public string? SetupError { get; private set; }

    /// <summary>Why the daemon could not be published; the VM still boots (without it) for the harness tests.</summary>
    public string? PublishError { get; private set; }

    /// <summary>Serial console + host output of the run, written next to the test assembly.</summary>
    public string LogPath { get; } = Path.Combine(AppContext.BaseDirectory, "systemd-vm-serial.log");

    internal IReadOnlyDictionary<string, string> Results => _results.Values;

    public async Task InitializeAsync()
    {
        try
        {
            await RunAsync().ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is IOException or InvalidOperationException or System.ComponentModel.Win32Exception or UnauthorizedAccessException)
        {
            SetupError = $"full-tier VM setup failed: {ex.Message}";
        }
        finally
        {
            await File.WriteAllTextAsync(LogPath, _log.ToString()).ConfigureAwait(false);
        }
    }

    public Task DisposeAsync() => Task.CompletedTask;

    private async Task RunAsync()
    {
        var repo = FindRepoRoot();
        SetupError = HostError();
        if (SetupError is not null)
        {
            return;
        }

        // The rootfs on its own clock: the first build on a machine (debootstrap + kernel) takes minutes, cached
        // runs none, and neither should eat into the VM's bound.
        var rootfs = await RunProcessAsync(
            "bash", [Path.Combine(repo, "tests", "vm", "systemd", "build-rootfs.sh")], repo, RootfsTimeout).ConfigureAwait(false);
        _log.Append("== build-rootfs.sh (exit ").Append(rootfs.ExitCode).Append(")\n").Append(Tail(rootfs.Output, 40)).Append('\n');
        if (rootfs.ExitCode != 0)
        {
            SetupError = $"tests/vm/systemd/build-rootfs.sh failed (exit {rootfs.ExitCode}):\n{Tail(rootfs.Output, 30)}";
            return;
        }

        var (publishDir, publishError) = await DaemonPublish.GetAsync().ConfigureAwait(false);
        PublishError = publishError;
        _log.Append("== dotnet publish: ").Append(publishError ?? "ok, " + publishDir).Append('\n');
        var args = new List<string>
        {
            Path.Combine(repo, "tests", "vm", "systemd", "run.sh"),
            "--scenario", Path.Combine(repo, "tests", "vm", "systemd", "scenarios", "daemon.sh"),
            "--timeout", ((int)VmTimeout.TotalSeconds - 30).ToString(CultureInfo.InvariantCulture),
        };
        if (PublishError is null)
        {
            args.AddRange(["--publish", publishDir!]);
        }

        var vm = await RunProcessAsync("bash", args, repo, VmTimeout).ConfigureAwait(false);
        _log.Append("== run.sh (exit ").Append(vm.ExitCode).Append(")\n").Append(vm.Output);
        _results = SystemdVmResults.Parse(vm.Output);
        VmFixture.SaveConsole(repo, "systemd-daemon.sh", vm.Output);
        _sink.OnMessage(new DiagnosticMessage($"systemd VM: exit {vm.ExitCode}, {_results.Values.Count} results, log {LogPath}"));
        if (!_results.Values.ContainsKey("end"))
        {
            SetupError = $"the VM scenario did not run to its end (run.sh exit {vm.ExitCode}); last output:\n{Tail(vm.Output, 40)}";
        }
    }

    /// <summary>The value a scenario printed for <paramref name="key"/>; fails the calling test when it is absent.</summary>
    public string Value(string key)
    {
        if (_results.TryGet(key, out var value))
        {
            return value;
        }

        var why = new StringBuilder($"the VM run printed no 'RESULT systemd {key}=' line.");
        if (SetupError is not null)
        {
            why.Append('\n').Append(SetupError);
        }

        if (PublishError is not null)
        {
            why.Append('\n').Append(PublishError);
        }

        foreach (var hint in new[] { "host_install", "daemon_installed" })
        {
            if (_results.TryGet(hint, out var h))
            {
                why.Append('\n').Append(hint).Append('=').Append(h);
                if (h == "absent")
                {
                    why.Append(" (deploy/install.sh is not in this tree yet)");
                }
            }
        }

        why.Append("\nfull log: ").Append(LogPath);
        throw new XunitException(why.ToString());
    }

    /// <summary>The integer a scenario printed for <paramref name="key"/>; fails the calling test when absent or not a number.</summary>
    public long Number(string key)
    {
        var text = Value(key);
        return SystemdVmResults.TryParseLong(text, out var n)
            ? n
            : throw new XunitException($"RESULT systemd {key}='{text}' is not an integer (log: {LogPath})");
    }

    /// <summary>Fails the calling test when the VM never produced a complete run.</summary>
    public void RequireCompleteRun()
    {
        if (SetupError is not null)
        {
            throw new XunitException(SetupError + "\nfull log: " + LogPath);
        }
    }

    internal static string FindRepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "NbdDaemon.sln")))
            {
                return dir.FullName;
            }
        }

        throw new InvalidOperationException($"NbdDaemon.sln not found above {AppContext.BaseDirectory}");
    }

    /// <summary>Why this host cannot run the full tier (a missing tool, not root), or null.</summary>
    internal static string? HostError()
    {
        var missing = RequiredTools.Where(t => FindOnPath(t) is null).ToList();
        if (missing.Count > 0)
        {
            return $"missing tools on this machine: {string.Join(", ", missing)} (apt-get install qemu-system-x86 debootstrap cpio zstd)";
        }

        return string.Equals(Environment.UserName, "root", StringComparison.Ordinal)
            ? null
            : "the full tier needs root (debootstrap, chroot, mknod); run the tests as root";
    }

    private static string? FindOnPath(string tool)
    {
        var path = Environment.GetEnvironmentVariable("PATH") ?? string.Empty;
        var dirs = path.Split(':', StringSplitOptions.RemoveEmptyEntries).Concat(["/usr/sbin", "/sbin"]);
        return dirs.Select(d => Path.Combine(d, tool)).FirstOrDefault(File.Exists);
    }

    internal static string Tail(string text, int lines)
    {
        var all = text.Split('\n');
        return string.Join('\n', all.Skip(Math.Max(0, all.Length - lines)));
    }

    private static async Task<(int ExitCode, string Output)> RunProcessAsync(string file, IEnumerable<string> args, string cwd, TimeSpan timeout)
    {
        var psi = new ProcessStartInfo(file)
        {
            WorkingDirectory = cwd,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }

        var output = new StringBuilder();
        using var process = new Process { StartInfo = psi };
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) { lock (output) { output.Append(e.Data).Append('\n'); } } };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) { lock (output) { output.Append(e.Data).Append('\n'); } } };
        process.Start();
        process.StandardInput.Close();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await process.WaitForExitAsync(cts.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync(CancellationToken.None).ConfigureAwait(false);
            lock (output)
            {
                output.Append($"\n[fixture] {file} killed after {timeout.TotalSeconds:F0} s\n");
            }
        }

        lock (output)
        {
            return (process.ExitCode, output.ToString());
        }
    }
}

/// <summary>All full-tier tests share one VM boot.</summary>
[CollectionDefinition(Name)]
public sealed class SystemdVmCollection : ICollectionFixture<SystemdVmFixture>
{
    public const string Name = "systemd VM";
}

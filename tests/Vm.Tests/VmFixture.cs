using System.Diagnostics;
using System.Text;
using Xunit.Sdk;

namespace Vm.Tests;

[CollectionDefinition(Name)]
public sealed class VmCollection : ICollectionFixture<VmFixture>
{
    public const string Name = "vm";
}

/// <summary>
/// Boots each scenario's VM once and shares the run between the tests that assert on it. The daemon is published
/// once, only when a daemon scenario is first asked for, so the nbd-client anchor does not depend on it.
/// Everything missing (tool, kernel, publish) fails the asking test with the reason; nothing is skipped.
/// </summary>
public sealed class VmFixture : IDisposable
{
    private readonly Lock _gate = new();
    private readonly Dictionary<string, Task<VmRun>> _runs = new(StringComparer.Ordinal);

    public VmFixture()
    {
        RepoRoot = FindRepoRoot(AppContext.BaseDirectory);
        VmDir = Path.Combine(RepoRoot, "tests", "vm");
    }

    public string RepoRoot { get; }

    public string VmDir { get; }

    public Task<VmRun> RunAsync(ScenarioSpec spec)
    {
        ArgumentNullException.ThrowIfNull(spec);
        lock (_gate)
        {
            if (!_runs.TryGetValue(spec.Script, out var run))
            {
                run = Task.Run(() => BootAsync(spec));
                _runs[spec.Script] = run;
            }

            return run;
        }
    }

    private async Task<VmRun> BootAsync(ScenarioSpec spec)
    {
        RequireHostTools(spec.Modules.Count > 0 ? spec.Programs.Append("modinfo") : spec.Programs);
        var args = new List<string> { Path.Combine(VmDir, "run-vm.sh"), "--script", Path.Combine(VmDir, "scenarios", spec.Script), "--timeout", spec.TimeoutSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture) };
        foreach (var p in spec.Programs)
        {
            args.Add("--bin");
            args.Add(p);
        }

        foreach (var m in spec.Modules)
        {
            args.Add("--module");
            args.Add(m);
        }

        if (spec.NeedsTools)
        {
            args.AddRange(VmTools.AddArguments(await VmTools.BuildAsync(RepoRoot)));
        }

        if (spec.NeedsDaemon)
        {
            args.Add("--daemon");
            args.Add(await PublishDaemonAsync());
        }

        if (spec.NeedsRelayChild)
        {
            var (dir, error) = await RelayChildPublish.GetAsync();
            args.Add("--app");
            args.Add(dir ?? throw new XunitException(error));
        }

        var sw = Stopwatch.StartNew();
        var (code, output) = await ExecAsync("bash", args, TimeSpan.FromSeconds(spec.TimeoutSeconds + 300));
        var run = new VmRun(spec.Script, code, output, sw.Elapsed);
        SaveConsole(RepoRoot, spec.Script, output);
        if (code == 2 || (!run.Completed && run.Results.Count == 0))
        {
            throw new XunitException($"VM scenario {spec.Script} did not run (run-vm.sh exit {code}).\n{run.Tail()}");
        }

        return run;
    }

    private static async Task<string> PublishDaemonAsync()
    {
        var (dir, error) = await DaemonPublish.GetAsync();
        return dir ?? throw new XunitException(error);
    }

    private static void RequireHostTools(IEnumerable<string> programs)
    {
        var missing = new[] { "qemu-system-x86_64", "cpio", "gzip", "apt-get", "dpkg-deb" }
            .Concat(programs)
            .Where(p => FindOnPath(p) is null)
            .ToList();
        if (!File.Exists("/bin/busybox"))
        {
            missing.Add("/bin/busybox (busybox-static)");
        }

        if (missing.Count > 0)
        {
            throw new XunitException("the VM tier needs these host tools, which are missing: " + string.Join(", ", missing) +
                                     " (install the packages in .ci/packages.txt)");
        }
    }

    private static string? FindOnPath(string program) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "/usr/sbin:/usr/bin:/sbin:/bin")
            .Split(':', StringSplitOptions.RemoveEmptyEntries)
            .Concat(["/usr/sbin", "/sbin"])
            .Select(d => Path.Combine(d, program))
            .FirstOrDefault(File.Exists);

    internal static string FindRepoRoot(string start)
    {
        for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "NbdDaemon.sln")))
            {
                return dir.FullName;
            }
        }

        throw new InvalidOperationException($"NbdDaemon.sln not found above {start}");
    }

    /// <summary>
    /// Keeps the VM's whole console under artifacts/vm-runs/: an assertion names one RESULT line, and the LOG/NOTE
    /// lines around it (the daemon's own messages) are what explains a failure seen only in CI.
    /// </summary>
    internal static void SaveConsole(string repoRoot, string script, string output)
    {
        var dir = Path.Combine(repoRoot, "artifacts", "vm-runs");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, Path.GetFileNameWithoutExtension(script) + ".log"), output);
    }

    internal static async Task<(int Code, string Output)> ExecAsync(string file, IEnumerable<string> args, TimeSpan timeout)
    {
        var psi = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }

        // The test host's MSBuild variables would steer a nested `dotnet publish` to the wrong SDK pieces.
        foreach (var v in new[] { "MSBuildExtensionsPath", "MSBUILD_EXE_PATH", "MSBuildSDKsPath", "MSBuildLoadMicrosoftTargetsReadOnly" })
        {
            psi.Environment.Remove(v);
        }

        var output = new StringBuilder();
        using var process = new Process { StartInfo = psi };
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) { lock (output) { output.Append(e.Data).Append('\n'); } } };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) { lock (output) { output.Append(e.Data).Append('\n'); } } };
        if (!process.Start())
        {
            throw new XunitException($"could not start {file}");
        }

        process.StandardInput.Close();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await process.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
            lock (output)
            {
                output.Append($"[test driver] {file} killed after {timeout}\n");
            }
        }

        process.WaitForExit();
        lock (output)
        {
            return (process.ExitCode, output.ToString());
        }
    }

    public void Dispose()
    {
        // The published daemon is shared by every fixture of the process (DaemonPublish) and removed at exit.
    }
}

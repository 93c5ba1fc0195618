using System.Diagnostics;
using Microsoft.Extensions.Configuration;
using NbdDaemon.Configuration;
using NbdDaemon.Mappings.Linux;

namespace NbdDaemon.Tests.Deploy;

[System.Runtime.Versioning.SupportedOSPlatform("linux")]
public sealed class InstallScriptTests
{
    private static string RepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "deploy", "install.sh")))
            {
                return dir.FullName;
            }
        }

        throw new InvalidOperationException("deploy/install.sh not found above " + AppContext.BaseDirectory);
    }

    private static Task<(int Exit, string Output)> RunAsync(string file, params string[] args) => RunAsync(file, TimeSpan.FromSeconds(60), args);

    private static async Task<(int Exit, string Output)> RunAsync(string file, TimeSpan limit, params string[] args)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string a in args)
        {
            psi.ArgumentList.Add(a);
        }

        // The test host's MSBuild variables would steer a nested `dotnet publish` to the wrong SDK pieces.
        foreach (string v in new[] { "MSBuildExtensionsPath", "MSBUILD_EXE_PATH", "MSBuildSDKsPath", "MSBuildLoadMicrosoftTargetsReadOnly" })
        {
            psi.Environment.Remove(v);
        }

        using Process p = Process.Start(psi) ?? throw new InvalidOperationException("cannot start " + file);
        Task<string> output = p.StandardOutput.ReadToEndAsync();
        Task<string> error = p.StandardError.ReadToEndAsync();
        await p.WaitForExitAsync().WaitAsync(limit);
        return (p.ExitCode, await output + await error);
    }

    /// <summary>
    /// The documented way to build what install.sh installs. It failed to build at all (its
    /// -p:GenerateDocumentationFile=false turned the build's IDE0005 check into error EnableGenerateDocumentationFile),
    /// and its single-file binary cannot find Serilog's sinks by itself, so a WriteTo of the Console sink must still work.
    /// </summary>
    [Fact]
    public async Task Publish_SingleFileBinary_BuildsRunsAndFindsTheShippedSink()
    {
        using var dir = new TempDirectory();
        string output = Path.Combine(dir.Path, "publish");

        (int exit, string log) = await RunAsync(Path.Combine(RepoRoot(), "deploy", "publish.sh"), TimeSpan.FromMinutes(10), output);
        Assert.True(exit == 0, log);
        string binary = Path.Combine(output, "nbd-daemon");
        Assert.True(File.Exists(Path.Combine(output, "README.md")), log);
        Assert.False(File.Exists(Path.Combine(output, "Serilog.dll")), "not a single file: " + string.Join(", ", Directory.GetFiles(output).Select(Path.GetFileName)));

        (int version, string versionText) = await RunAsync(binary, "--version");
        Assert.True(version == 0, versionText);

        // A bad mapping stops the start (exit 78) after the logging was checked: the Console entry is found (no error
        // for it), the File entry is not.
        (int start, string errors) = await RunAsync(binary,
            "--Nbd:Mappings:0:Name=x", "--Nbd:Mappings:0:Uri=bogus://", "--Serilog:WriteTo:0=Console", "--Serilog:WriteTo:1:Name=File");
        Assert.Equal(78, start);
        Assert.DoesNotContain("Serilog:WriteTo:0", errors, StringComparison.Ordinal);
        Assert.Contains("Serilog:WriteTo:1: no sink, enricher or filter called 'File'", errors, StringComparison.Ordinal);
        Assert.Contains("Nbd:Mappings:0:Uri", errors, StringComparison.Ordinal);
    }

    private static string FakePublish(TempDirectory dir)
    {
        string publish = Path.Combine(dir.Path, "publish");
        Directory.CreateDirectory(publish);
        File.WriteAllText(Path.Combine(publish, "nbd-daemon"), "#!/bin/sh\nexit 0\n");
        File.SetUnixFileMode(Path.Combine(publish, "nbd-daemon"), UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        File.WriteAllText(Path.Combine(publish, "appsettings.json"), "{}");
        return publish;
    }

    private const string Lib = "usr/local/lib/nbd-daemon";

    [Fact]
    public async Task Install_IntoDestDir_PlacesFilesAndIsIdempotentKeepingAdminConfig()
    {
        using var dir = new TempDirectory();
        string publish = FakePublish(dir);
        string root = Path.Combine(dir.Path, "root");
        string script = Path.Combine(RepoRoot(), "deploy", "install.sh");

        (int exit, string output) = await RunAsync(script, publish, "--root", root);
        Assert.True(exit == 0, output);

        // What the unit starts: `current`, a symlink to the release directory this install made.
        string binary = Path.Combine(root, Lib, "current/nbd-daemon");
        Assert.True(File.Exists(binary));
        Assert.StartsWith("releases/", new FileInfo(Path.Combine(root, Lib, "current")).LinkTarget, StringComparison.Ordinal);
        Assert.True(File.GetUnixFileMode(binary).HasFlag(UnixFileMode.UserExecute));
        Assert.True(File.Exists(Path.Combine(root, Lib, "current/appsettings.json")));
        Assert.Equal(File.ReadAllText(Path.Combine(RepoRoot(), "systemd/nbd-daemon.service")), File.ReadAllText(Path.Combine(root, "etc/systemd/system/nbd-daemon.service")));
        Assert.Contains("ExecStart=/usr/local/lib/nbd-daemon/current/nbd-daemon\n", File.ReadAllText(Path.Combine(root, "etc/systemd/system/nbd-daemon.service")), StringComparison.Ordinal);
        Assert.Equal("nbd\n", File.ReadAllText(Path.Combine(root, "etc/modules-load.d/nbd.conf")));
        // The driver's default, commented out: an options line would override the admin's from files sorting before.
        Assert.DoesNotContain(File.ReadAllLines(Path.Combine(root, "etc/modprobe.d/nbd.conf")), l => l.StartsWith("options", StringComparison.Ordinal));
        string config = Path.Combine(root, "etc/nbd-daemon/appsettings.json");
        Assert.Equal(File.ReadAllText(Path.Combine(RepoRoot(), "deploy/appsettings.example.json")), File.ReadAllText(config));

        File.WriteAllText(config, "{ \"Nbd\": { \"Mappings\": [] } } // admin's");
        File.WriteAllText(Path.Combine(root, "etc/modules-load.d/nbd.conf"), "# loaded by the admin's own means\n");
        (exit, output) = await RunAsync(script, publish, "--root", root);
        Assert.True(exit == 0, output);
        Assert.Contains("kept existing", output, StringComparison.Ordinal);
        Assert.Equal("{ \"Nbd\": { \"Mappings\": [] } } // admin's", File.ReadAllText(config));
        Assert.Equal("# loaded by the admin's own means\n", File.ReadAllText(Path.Combine(root, "etc/modules-load.d/nbd.conf")));
        Assert.Single(Directory.GetDirectories(Path.Combine(root, Lib, "releases"))); // the first release ran nothing: gone
    }

    /// <summary>
    /// The upgrade path: install.sh while the service runs (then `systemctl restart`). Copying onto a running executable
    /// fails with ETXTBSY, and even a rename over its files is not enough: .NET opens files by path long after its start
    /// (an assembly first used while stopping; a single-file bundle at the offsets it read), so the running process must
    /// keep its whole directory until it exits.
    /// </summary>
    [Fact]
    public async Task Install_OverADaemonThatIsRunning_ItKeepsItsReleaseDirectoryUntilItEnds()
    {
        using var dir = new TempDirectory();
        string publish = FakePublish(dir);
        string root = Path.Combine(dir.Path, "root");
        string script = Path.Combine(RepoRoot(), "deploy", "install.sh");
        File.Copy("/bin/sleep", Path.Combine(publish, "nbd-daemon"), overwrite: true);
        File.WriteAllText(Path.Combine(publish, "appsettings.json"), "{ \"old\": 1 }");
        (int exit, string output) = await RunAsync(script, publish, "--root", root);
        Assert.True(exit == 0, output);
        string oldRelease = Path.GetFullPath(Path.Combine(root, Lib, new FileInfo(Path.Combine(root, Lib, "current")).LinkTarget!));
        using Process running = Process.Start(Path.Combine(root, Lib, "current/nbd-daemon"), "60");
        try
        {
            File.WriteAllText(Path.Combine(publish, "nbd-daemon"), "#!/bin/sh\necho new\n");
            File.WriteAllText(Path.Combine(publish, "appsettings.json"), "{ \"new\": 1 }");

            (exit, output) = await RunAsync(script, publish, "--root", root);

            Assert.True(exit == 0, output);
            Assert.Equal("#!/bin/sh\necho new\n", File.ReadAllText(Path.Combine(root, Lib, "current/nbd-daemon")));
            Assert.Equal("{ \"old\": 1 }", File.ReadAllText(Path.Combine(oldRelease, "appsettings.json")));
            Assert.Equal(File.ReadAllBytes("/bin/sleep"), File.ReadAllBytes(Path.Combine(oldRelease, "nbd-daemon")));
            Assert.False(running.HasExited);
            Assert.Empty(Directory.GetDirectories(Path.Combine(root, Lib, "releases"), ".*"));
        }
        finally
        {
            running.Kill();
            await running.WaitForExitAsync();
        }

        // Once it ended, the next install removes its directory.
        (exit, output) = await RunAsync(script, publish, "--root", root);
        Assert.True(exit == 0, output);
        Assert.False(Directory.Exists(oldRelease));
        Assert.Single(Directory.GetDirectories(Path.Combine(root, Lib, "releases")));
    }

    /// <summary>
    /// The layout before release directories kept the files directly in the library directory: left alone while a
    /// process runs from there, removed by the first install after it ended.
    /// </summary>
    [Fact]
    public async Task Install_OverTheFlatLayout_LeftWhileItRunsRemovedAfter()
    {
        using var dir = new TempDirectory();
        string publish = FakePublish(dir);
        string root = Path.Combine(dir.Path, "root");
        string script = Path.Combine(RepoRoot(), "deploy", "install.sh");
        string flat = Path.Combine(root, Lib, "nbd-daemon");
        Directory.CreateDirectory(Path.GetDirectoryName(flat)!);
        File.Copy("/bin/sleep", flat);
        File.WriteAllText(Path.Combine(root, Lib, "appsettings.json"), "{}");
        using (Process running = Process.Start(flat, "60"))
        {
            (int exit, string output) = await RunAsync(script, publish, "--root", root);
            Assert.True(exit == 0, output);
            Assert.True(File.Exists(flat));
            Assert.True(File.Exists(Path.Combine(root, Lib, "appsettings.json")));
            running.Kill();
            await running.WaitForExitAsync();
        }

        (int again, string log) = await RunAsync(script, publish, "--root", root);
        Assert.True(again == 0, log);
        Assert.Equal(["current", "releases"], Directory.EnumerateFileSystemEntries(Path.Combine(root, Lib)).Select(Path.GetFileName).Order(StringComparer.Ordinal));
    }

    /// <summary>
    /// `cp -a` kept the builder's owner and modes: a build user could rewrite a binary that runs as root, and a umask 077
    /// build left appsettings.json unreadable to the service, which keeps no CAP_DAC_OVERRIDE (exit 78 for good).
    /// </summary>
    [Fact]
    public async Task Install_BuildersModes_NormalisedRootsFilesReadableByAll()
    {
        using var dir = new TempDirectory();
        string publish = FakePublish(dir);
        File.SetUnixFileMode(Path.Combine(publish, "appsettings.json"), UnixFileMode.UserRead | UnixFileMode.UserWrite);
        string extra = Path.Combine(publish, "extra.dll");
        File.WriteAllText(extra, "x");
        File.SetUnixFileMode(extra, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.GroupWrite | UnixFileMode.OtherWrite | UnixFileMode.OtherRead);
        string root = Path.Combine(dir.Path, "root");

        (int exit, string output) = await RunAsync(Path.Combine(RepoRoot(), "deploy", "install.sh"), publish, "--root", root);

        Assert.True(exit == 0, output);
        const UnixFileMode file = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead;
        const UnixFileMode executable = file | UnixFileMode.UserExecute | UnixFileMode.GroupExecute | UnixFileMode.OtherExecute;
        Assert.Equal(file, File.GetUnixFileMode(Path.Combine(root, Lib, "current/appsettings.json")));
        Assert.Equal(file, File.GetUnixFileMode(Path.Combine(root, Lib, "current/extra.dll")));
        Assert.Equal(executable, File.GetUnixFileMode(Path.Combine(root, Lib, "current/nbd-daemon")));
        if (Environment.UserName == "root")
        {
            (int stat, string owners) = await RunAsync("stat", "-c", "%u:%g", Path.Combine(root, Lib, "current/extra.dll"), Path.Combine(root, Lib, "current/nbd-daemon"));
            Assert.Equal(0, stat);
            Assert.Equal("0:0\n0:0\n", owners);
        }
    }

    /// <summary>There was no way back: the files had to be found and removed by hand.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Uninstall_AfterInstall_RemovesWhatItInstalledKeepsTheAdminsFiles(bool purge)
    {
        using var dir = new TempDirectory();
        string publish = FakePublish(dir);
        string root = Path.Combine(dir.Path, "root");
        string script = Path.Combine(RepoRoot(), "deploy", "install.sh");
        (int exit, string output) = await RunAsync(script, publish, "--root", root);
        Assert.True(exit == 0, output);
        File.WriteAllText(Path.Combine(root, "etc/modprobe.d/nbd.conf"), "options nbd nbds_max=64\n"); // the admin's now
        Directory.CreateDirectory(Path.Combine(root, "etc/systemd/system/nbd-daemon.service.d"));

        (exit, output) = purge ? await RunAsync(script, "--uninstall", "--purge", "--root", root) : await RunAsync(script, "--uninstall", "--root", root);

        Assert.True(exit == 0, output);
        Assert.False(Directory.Exists(Path.Combine(root, Lib)));
        Assert.False(File.Exists(Path.Combine(root, "etc/systemd/system/nbd-daemon.service")));
        Assert.False(File.Exists(Path.Combine(root, "etc/modules-load.d/nbd.conf")));
        Assert.Equal("options nbd nbds_max=64\n", File.ReadAllText(Path.Combine(root, "etc/modprobe.d/nbd.conf")));
        Assert.True(Directory.Exists(Path.Combine(root, "etc/systemd/system/nbd-daemon.service.d")));
        Assert.Equal(!purge, File.Exists(Path.Combine(root, "etc/nbd-daemon/appsettings.json")));
        Assert.Contains("kept " + Path.Combine(root, "etc/modprobe.d/nbd.conf") + " (not the one this version ships: the admin's)", output, StringComparison.Ordinal);
        Assert.Equal(!purge, output.Contains("(the configuration; --purge removes it)", StringComparison.Ordinal));

        // Again: nothing left to remove is not an error.
        (exit, output) = await RunAsync(script, "--uninstall", "--root", root);
        Assert.True(exit == 0, output);
    }

    [Fact]
    public async Task Uninstall_WhileADaemonRunsFromIt_RefusedNothingRemoved()
    {
        using var dir = new TempDirectory();
        string publish = FakePublish(dir);
        File.Copy("/bin/sleep", Path.Combine(publish, "nbd-daemon"), overwrite: true);
        string root = Path.Combine(dir.Path, "root");
        string script = Path.Combine(RepoRoot(), "deploy", "install.sh");
        (int exit, string output) = await RunAsync(script, publish, "--root", root);
        Assert.True(exit == 0, output);
        using Process running = Process.Start(Path.Combine(root, Lib, "current/nbd-daemon"), "60");
        try
        {
            (exit, output) = await RunAsync(script, "--uninstall", "--root", root);

            Assert.Equal(75, exit);
            Assert.Contains("an nbd-daemon not started by systemd runs from", output, StringComparison.Ordinal);
            Assert.True(File.Exists(Path.Combine(root, Lib, "current/nbd-daemon")));
            Assert.True(File.Exists(Path.Combine(root, "etc/systemd/system/nbd-daemon.service")));
        }
        finally
        {
            running.Kill();
            await running.WaitForExitAsync();
        }
    }

    [Fact]
    public async Task Purge_WithoutUninstall_UsageError()
    {
        using var dir = new TempDirectory();
        (int exit, string output) = await RunAsync(Path.Combine(RepoRoot(), "deploy", "install.sh"), "--purge", "--root", dir.File("root"));
        Assert.Equal(64, exit);
        Assert.Contains("--purge goes with --uninstall", output, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Install_MissingPublishDir_FailsWithHint()
    {
        using var dir = new TempDirectory();
        (int exit, string output) = await RunAsync(Path.Combine(RepoRoot(), "deploy", "install.sh"), dir.File("nope"), "--root", dir.File("root"));
        Assert.Equal(66, exit);
        Assert.Contains("run deploy/publish.sh first", output, StringComparison.Ordinal);
        Assert.False(Directory.Exists(dir.File("root")));
    }

    [Fact]
    public async Task Unit_SystemdAnalyzeVerify_NoErrorsOnceBinaryExists()
    {
        using var dir = new TempDirectory();
        string publish = FakePublish(dir);
        string unit = File.ReadAllText(Path.Combine(RepoRoot(), "systemd/nbd-daemon.service"))
            .Replace("ExecStart=/usr/local/lib/nbd-daemon/current/nbd-daemon", "ExecStart=" + Path.Combine(publish, "nbd-daemon"), StringComparison.Ordinal);
        string unitPath = dir.File("nbd-daemon.service");
        File.WriteAllText(unitPath, unit);

        (int exit, string output) = await RunAsync("systemd-analyze", "verify", "--man=no", unitPath);

        Assert.True(exit == 0, "systemd-analyze verify: " + output);
    }

    [Fact]
    public void ExampleConfiguration_CommentedOutMappingsAreValidWhenUncommented()
    {
        // What an admin does with the example: remove the comment markers of the mapping lines.
        IEnumerable<string> lines = File.ReadAllLines(Path.Combine(RepoRoot(), "deploy/appsettings.example.json"))
            .Select(l => l.TrimStart())
            .Select(l => l.StartsWith("//", StringComparison.Ordinal) ? l[2..].TrimStart() is [('{' or '}' or '"'), ..] json ? json : null : l)
            .OfType<string>();
        using var json = new MemoryStream(System.Text.Encoding.UTF8.GetBytes(string.Join('\n', lines)));
        IConfigurationRoot config = new ConfigurationBuilder().AddJsonStream(json).Build();

        IReadOnlyList<MappingOptions> mappings = new NbdConfigurationReader(new ProtocolUriParser()).Read(config);

        Assert.Equal(["data", "root"], mappings.Select(m => m.Name));
        Assert.Equal(KernelInterface.Netlink, mappings[1].Interface);
        Assert.Equal(StopAction.Leave, mappings[1].OnStop);
        Assert.Equal(TimeSpan.FromSeconds(30), mappings[1].KeepAlive);
    }

    [Fact]
    public void ExampleConfiguration_ParsesWithNoMappings()
    {
        IConfigurationRoot config = new ConfigurationBuilder().AddJsonFile(Path.Combine(RepoRoot(), "deploy/appsettings.example.json")).Build();
        Assert.Empty(new NbdConfigurationReader(new ProtocolUriParser()).Read(config));
        Assert.Equal("Information", config["Serilog:MinimumLevel:Default"]);
    }
}

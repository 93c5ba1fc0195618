using System.Diagnostics;
using Xunit.Sdk;

namespace Vm.Tests;

/// <summary>
/// Publishes tests/Nbd.Kernel.Probe once (self-contained), boots it once in the VM with
/// tests/Nbd.Kernel.Probe/probe-scenario.sh, and shares the parsed run between the KernelProbe tests.
/// Anything missing (tool, kernel, publish) fails the asking test with the reason; nothing is skipped.
/// </summary>
public sealed class KernelProbeFixture : IDisposable
{
    private const int TimeoutSeconds = 600;
    private readonly Lock _gate = new();
    private readonly string _publishDir = Path.Combine(Path.GetTempPath(), "nbd-kernel-probe-publish-" + Guid.NewGuid().ToString("N"));
    private Task<VmRun>? _run;

    /// <summary>The probe's VM run; the first caller starts it, the others await the same one.</summary>
    public Task<VmRun> RunAsync(VmFixture vm)
    {
        ArgumentNullException.ThrowIfNull(vm);
        lock (_gate)
        {
            return _run ??= Task.Run(() => BootAsync(vm));
        }
    }

    private async Task<VmRun> BootAsync(VmFixture vm)
    {
        var missing = new[] { "qemu-system-x86_64", "cpio", "gzip", "apt-get", "dpkg-deb", "nbd-server" }
            .Where(p => !new[] { "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin" }.Any(d => File.Exists(Path.Combine(d, p))))
            .ToList();
        if (!File.Exists("/bin/busybox"))
        {
            missing.Add("/bin/busybox (busybox-static)");
        }

        if (missing.Count > 0)
        {
            throw new XunitException("the kernel probe needs these host tools, which are missing: " + string.Join(", ", missing));
        }

        var probeDir = Path.Combine(vm.RepoRoot, "tests", "Nbd.Kernel.Probe");
        var (pcode, poutput) = await VmFixture.ExecAsync(
            "dotnet",
            ["publish", probeDir, "-c", "Release", "-r", "linux-x64", "--self-contained", "-o", _publishDir, "-nologo"],
            TimeSpan.FromMinutes(10));
        if (pcode != 0 || !File.Exists(Path.Combine(_publishDir, "Nbd.Kernel.Probe")))
        {
            throw new XunitException($"dotnet publish of tests/Nbd.Kernel.Probe failed (exit {pcode}):\n{poutput}");
        }

        var sw = Stopwatch.StartNew();
        var (code, output) = await VmFixture.ExecAsync(
            "bash",
            [
                Path.Combine(vm.VmDir, "run-vm.sh"), "--script", Path.Combine(probeDir, "probe-scenario.sh"),
                "--app", _publishDir + ":/opt/probe", "--bin", "nbd-server",
                "--timeout", TimeoutSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ],
            TimeSpan.FromSeconds(TimeoutSeconds + 300));
        var run = new VmRun("probe-scenario.sh", code, output, sw.Elapsed);
        if (code == 2 || (!run.Completed && run.Results.Count == 0))
        {
            throw new XunitException($"the kernel probe did not run in the VM (run-vm.sh exit {code}).\n{run.Tail()}");
        }

        return run;
    }

    public void Dispose()
    {
        if (Directory.Exists(_publishDir))
        {
            Directory.Delete(_publishDir, recursive: true);
        }
    }
}

namespace Nbd.Kernel.Tests;

/// <summary>A throwaway /sys/block look-alike in a temp directory.</summary>
internal sealed class FakeSysfs : IDisposable
{
    public FakeSysfs() => Root = Directory.CreateTempSubdirectory("nbd-sysfs-").FullName;

    public string Root { get; }

    public FakeSysfs Device(int index, ulong sectors, int? pid = null, string? backend = null, uint? logicalBlockSize = 1024)
    {
        string dir = Path.Combine(Root, $"nbd{index}");
        Directory.CreateDirectory(Path.Combine(dir, "queue"));
        File.WriteAllText(Path.Combine(dir, "size"), $"{sectors}\n");
        if (pid is not null)
        {
            File.WriteAllText(Path.Combine(dir, "pid"), $"{pid}\n");
        }
        if (backend is not null)
        {
            File.WriteAllText(Path.Combine(dir, "backend"), backend + "\n");
        }
        if (logicalBlockSize is not null)
        {
            File.WriteAllText(Path.Combine(dir, "queue", "logical_block_size"), $"{logicalBlockSize}\n");
        }
        return this;
    }

    public void Dispose() => Directory.Delete(Root, recursive: true);
}

using System.Globalization;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel;

/// <summary>Reads /sys/block/nbdN. The root is a parameter so tests can point it at a fake tree.</summary>
public static class NbdSysfs
{
    /// <summary>The block layer reports <c>size</c> in 512-byte sectors whatever the logical block size.</summary>
    private const ulong SectorSize = 512;

    /// <summary>Reads the status of nbd<paramref name="index"/>.</summary>
    /// <exception cref="NbdKernelException">ENOENT when the device does not exist; EBADMSG when a file is malformed.</exception>
    public static NbdDeviceStatus Read(int index, string sysBlock = "/sys/block")
    {
        ArgumentOutOfRangeException.ThrowIfNegative(index);
        string name = "nbd" + index.ToString(CultureInfo.InvariantCulture);
        string dir = Path.Combine(sysBlock, name);
        if (!Directory.Exists(dir))
        {
            throw new NbdKernelException("/dev/" + name, "read " + dir, Errno.ENOENT, "no such nbd device; is the nbd module loaded?");
        }

        string? sizeText = ReadOptional(dir, "size")
            ?? throw new NbdKernelException("/dev/" + name, "read " + Path.Combine(dir, "size"), Errno.ENOENT);
        ulong sectors = ParseUInt64(sizeText, dir, "size");
        string? pidText = ReadOptional(dir, "pid");
        int? pid = pidText is null ? null : checked((int)ParseUInt64(pidText, dir, "pid"));
        string? backend = ReadOptional(dir, "backend");
        string? blockText = ReadOptional(dir, Path.Combine("queue", "logical_block_size"));
        uint logicalBlockSize = blockText is null ? 0 : checked((uint)ParseUInt64(blockText, dir, "queue/logical_block_size"));

        bool readOnly = ReadOptional(dir, "ro") is "1";

        return new NbdDeviceStatus(index, checked(sectors * SectorSize), pid, string.IsNullOrEmpty(backend) ? null : backend, logicalBlockSize)
        {
            ReadOnly = readOnly,
        };
    }

    /// <summary>Indexes of every nbdN under <paramref name="sysBlock"/>, ascending (partitions like nbd0p1 are not listed there).</summary>
    public static IReadOnlyList<int> ListDevices(string sysBlock = "/sys/block")
    {
        if (!Directory.Exists(sysBlock))
        {
            return [];
        }
        var result = new List<int>();
        foreach (string entry in Directory.EnumerateFileSystemEntries(sysBlock, "nbd*"))
        {
            string fileName = Path.GetFileName(entry);
            if (fileName.Length > 3 && fileName.AsSpan(3).IndexOfAnyExceptInRange('0', '9') < 0 &&
                int.TryParse(fileName.AsSpan(3), NumberStyles.None, CultureInfo.InvariantCulture, out int index))
            {
                result.Add(index);
            }
        }
        result.Sort();
        return result;
    }

    private static string? ReadOptional(string dir, string file)
    {
        try
        {
            return File.ReadAllText(Path.Combine(dir, file)).Trim();
        }
        catch (FileNotFoundException)
        {
            return null; // pid/backend vanish when the device is unconfigured, possibly between listing and reading
        }
        catch (DirectoryNotFoundException)
        {
            return null;
        }
    }

    private static ulong ParseUInt64(string text, string dir, string file)
    {
        if (!ulong.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out ulong value))
        {
            throw new NbdKernelException(dir, "read " + file, Errno.EBADMSG, $"unexpected content '{text}'");
        }
        return value;
    }
}

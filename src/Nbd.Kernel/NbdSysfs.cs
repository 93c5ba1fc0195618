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
        (string device, string dir) = DeviceDirectory(index, sysBlock);
        string? sizeText = ReadOptional(dir, "size")
            ?? throw new NbdKernelException(device, "read " + Path.Combine(dir, "size"), Errno.ENOENT);
        ulong sectors = ParseUInt64(sizeText, dir, "size");
        string? pidText = ReadOptional(dir, "pid");
        int? pid = pidText is null ? null : checked((int)ParseUInt64(pidText, dir, "pid"));
        string? backend = ReadOptional(dir, "backend");
        string? blockText = ReadOptional(dir, Path.Combine("queue", "logical_block_size"));
        uint logicalBlockSize = blockText is null ? 0 : checked((uint)ParseUInt64(blockText, dir, "queue/logical_block_size"));

        bool readOnly = ReadOptional(dir, "ro") is "1";

        // What the block layer will have the driver send; an attribute this kernel lacks reads as "not sent".
        return new NbdDeviceStatus(index, checked(sectors * SectorSize), pid, string.IsNullOrEmpty(backend) ? null : backend, logicalBlockSize)
        {
            ReadOnly = readOnly,
            WriteBack = ReadOptional(dir, Path.Combine("queue", "write_cache")) is "write back",
            Fua = ReadOptional(dir, Path.Combine("queue", "fua")) is "1",
            DiscardMaxBytes = ReadOptional(dir, Path.Combine("queue", "discard_max_bytes")) is string discard ? ParseUInt64(discard, dir, "queue/discard_max_bytes") : 0,
            WriteZeroesMaxBytes = ReadOptional(dir, Path.Combine("queue", "write_zeroes_max_bytes")) is string zeroes ? ParseUInt64(zeroes, dir, "queue/write_zeroes_max_bytes") : 0,
        };
    }

    /// <summary>
    /// Caps the requests the block layer makes for nbd<paramref name="index"/> (<c>queue/max_sectors_kb</c>) at
    /// <paramref name="maxBytes"/>, a server's maximum payload (NBD_INFO_BLOCK_SIZE). The driver sends each request as
    /// one NBD command, and a server may refuse a command over its maximum: an I/O error to whoever wrote. The limit is
    /// only ever lowered (a higher value is kept: an earlier user of the device may have lowered it for its own server,
    /// which costs larger requests, never correctness), in whole pages.
    /// </summary>
    /// <returns>The limit before and after, in KiB.</returns>
    /// <exception cref="NbdKernelException">ENOENT: no such device; EINVAL: <paramref name="maxBytes"/> is below the
    /// smallest limit the block layer takes (one page); EROFS and the like: sysfs could not be written.</exception>
    public static (uint Before, uint After) LimitRequestSize(int index, uint maxBytes, string sysBlock = "/sys/block")
    {
        (string device, string file, uint before) = ReadMaxSectorsKb(index, sysBlock);
        // Whole pages: the block layer takes no less than one, and a multiple of every logical block size (≤ 4096)
        // keeps requests from being cut inside a block.
        uint page = (uint)Environment.SystemPageSize;
        uint wanted = maxBytes / page * page / 1024;
        if (before <= wanted)
        {
            return (before, before);
        }

        if (maxBytes < page)
        {
            throw new NbdKernelException(device, "write " + file, Errno.EINVAL,
                $"the server takes requests of at most {maxBytes} bytes, and the block layer makes none smaller than a page ({page} bytes)");
        }

        WriteAttribute(device, file, wanted.ToString(CultureInfo.InvariantCulture));
        return (before, wanted);
    }

    /// <summary>
    /// Undoes <see cref="LimitRequestSize"/> when the device is given up: writes <paramref name="restoreKb"/> back to
    /// queue/max_sectors_kb, but only while it still holds <paramref name="expectedKb"/> (what the limit wrote): a value
    /// someone else set meanwhile is theirs. Returns whether it wrote.
    /// </summary>
    public static bool RestoreRequestSize(int index, uint expectedKb, uint restoreKb, string sysBlock = "/sys/block")
    {
        (string device, string file, uint current) = ReadMaxSectorsKb(index, sysBlock);
        if (current != expectedKb)
        {
            return false;
        }

        WriteAttribute(device, file, restoreKb.ToString(CultureInfo.InvariantCulture));
        return true;
    }

    /// <summary>The device's /dev path, its queue/max_sectors_kb file and the value in it (ENOENT when either is missing).</summary>
    private static (string Device, string File, uint Kb) ReadMaxSectorsKb(int index, string sysBlock)
    {
        (string device, string dir) = DeviceDirectory(index, sysBlock);
        string file = Path.Combine(dir, "queue", "max_sectors_kb");
        string text = ReadOptional(dir, Path.Combine("queue", "max_sectors_kb"))
            ?? throw new NbdKernelException(device, "read " + file, Errno.ENOENT);
        return (device, file, checked((uint)ParseUInt64(text, dir, "queue/max_sectors_kb")));
    }

    /// <summary>/sys/block/nbd<paramref name="index"/> and the device's /dev path (for errors); ENOENT when there is no such device.</summary>
    private static (string Device, string Dir) DeviceDirectory(int index, string sysBlock)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(index);
        string dir = Path.Combine(sysBlock, "nbd" + index.ToString(CultureInfo.InvariantCulture));
        if (!Directory.Exists(dir))
        {
            throw new NbdKernelException(NbdKernel.DevicePath(index), "read " + dir, Errno.ENOENT, "no such nbd device; is the nbd module loaded?");
        }

        return (NbdKernel.DevicePath(index), dir);
    }

    /// <summary>One write(2) of <paramref name="value"/> to a sysfs attribute, so the kernel's own errno is what is reported.</summary>
    private static unsafe void WriteAttribute(string device, string file, string value)
    {
        int fd = Libc.Open(file, NbdConstants.O_WRONLY | NbdConstants.O_TRUNC | NbdConstants.O_CLOEXEC);
        if (fd < 0)
        {
            throw new NbdKernelException(device, "open " + file, System.Runtime.InteropServices.Marshal.GetLastPInvokeError());
        }

        try
        {
            byte[] bytes = System.Text.Encoding.ASCII.GetBytes(value);
            fixed (byte* p = bytes)
            {
                if (Libc.Write(fd, p, (nuint)bytes.Length) < 0)
                {
                    throw new NbdKernelException(device, "write " + file, System.Runtime.InteropServices.Marshal.GetLastPInvokeError());
                }
            }
        }
        finally
        {
            _ = Libc.Close(fd);
        }
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
        catch (IOException) when (!Directory.Exists(dir))
        {
            // The device itself went away between the open and the read (DESTROY_ON_DISCONNECT, nbd_dev_remove):
            // kernfs answers ENODEV, which .NET throws as a bare IOException. Absent, like the device.
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

using Nbd.Kernel.Interop;

namespace Nbd.Kernel.Tests;

public sealed class NbdSysfsTests
{
    [Fact]
    public void Read_ConnectedDevice_AllFields()
    {
        using var sysfs = new FakeSysfs().Device(0, sectors: 2048, pid: 4321, backend: "mapping-a", logicalBlockSize: 4096);
        var status = NbdSysfs.Read(0, sysfs.Root);
        Assert.Equal(new NbdDeviceStatus(0, 2048 * 512, 4321, "mapping-a", 4096), status);
        Assert.True(status.IsConnected);
    }

    [Fact]
    public void Read_UnconfiguredDevice_NoPidNoBackend()
    {
        using var sysfs = new FakeSysfs().Device(3, sectors: 0, logicalBlockSize: null);
        var status = NbdSysfs.Read(3, sysfs.Root);
        Assert.Equal(new NbdDeviceStatus(3, 0, null, null, 0), status);
        Assert.False(status.IsConnected);
    }

    [Fact]
    public void Read_MissingDevice_ThrowsEnoent()
    {
        using var sysfs = new FakeSysfs();
        var ex = Assert.Throws<NbdKernelException>(() => NbdSysfs.Read(9, sysfs.Root));
        Assert.Equal(Errno.ENOENT, ex.Errno);
        Assert.Equal("/dev/nbd9", ex.Device);
    }

    [Fact]
    public void Read_GarbageSize_ThrowsEbadmsg()
    {
        using var sysfs = new FakeSysfs().Device(1, 0);
        File.WriteAllText(Path.Combine(sysfs.Root, "nbd1", "size"), "lots\n");
        Assert.Equal(Errno.EBADMSG, Assert.Throws<NbdKernelException>(() => NbdSysfs.Read(1, sysfs.Root)).Errno);
    }

    [Theory]
    [InlineData(65536u, 128u, 64u, "64")]
    [InlineData(100000u, 128u, 96u, "96")] // whole pages: 24 of 4 KiB
    [InlineData(33554432u, 128u, 128u, "128\n")] // a server taking more than the driver asks: left as it was
    [InlineData(1048576u, 64u, 64u, "64\n")] // lowered by an earlier user of the device: never raised
    public void LimitRequestSize_ServerMaximum_LowersMaxSectorsKbOnly(uint maxBytes, uint before, uint after, string file)
    {
        using var sysfs = new FakeSysfs().Device(2, 0);
        string path = MaxSectorsKb(sysfs, 2, before + "\n");

        Assert.Equal((before, after), NbdSysfs.LimitRequestSize(2, maxBytes, sysfs.Root));
        Assert.Equal(file, File.ReadAllText(path));
    }

    [Fact]
    public void LimitRequestSize_MaximumBelowAPage_RefusedNamingBoth()
    {
        using var sysfs = new FakeSysfs().Device(2, 0);
        string path = MaxSectorsKb(sysfs, 2, "128\n");

        var ex = Assert.Throws<NbdKernelException>(() => NbdSysfs.LimitRequestSize(2, 2048, sysfs.Root));

        Assert.Equal(Errno.EINVAL, ex.Errno);
        Assert.Contains("at most 2048 bytes", ex.Message, StringComparison.Ordinal);
        Assert.Contains($"a page ({Environment.SystemPageSize} bytes)", ex.Message, StringComparison.Ordinal);
        Assert.Equal("128\n", File.ReadAllText(path));
    }

    [Fact]
    public void LimitRequestSize_NoSuchDevice_Enoent()
    {
        using var sysfs = new FakeSysfs();
        Assert.Equal(Errno.ENOENT, Assert.Throws<NbdKernelException>(() => NbdSysfs.LimitRequestSize(4, 65536, sysfs.Root)).Errno);
    }

    [Theory]
    [InlineData("64\n", true, "128")] // still what the limit wrote: put back
    [InlineData("32\n", false, "32\n")] // changed by someone else since: theirs
    public void RestoreRequestSize_OnlyWhileTheLimitIsStillThere(string current, bool restored, string file)
    {
        using var sysfs = new FakeSysfs().Device(2, 0);
        string path = MaxSectorsKb(sysfs, 2, current);

        Assert.Equal(restored, NbdSysfs.RestoreRequestSize(2, 64, 128, sysfs.Root));
        Assert.Equal(file, File.ReadAllText(path));
    }

    private static string MaxSectorsKb(FakeSysfs sysfs, int index, string value)
    {
        string queue = Path.Combine(sysfs.Root, "nbd" + index, "queue");
        Directory.CreateDirectory(queue);
        string path = Path.Combine(queue, "max_sectors_kb");
        File.WriteAllText(path, value);
        return path;
    }

    [Fact]
    public void ListDevices_SortedNumerically_IgnoresOtherEntries()
    {
        using var sysfs = new FakeSysfs().Device(10, 0).Device(2, 0).Device(0, 0);
        Directory.CreateDirectory(Path.Combine(sysfs.Root, "sda"));
        Directory.CreateDirectory(Path.Combine(sysfs.Root, "nbdx"));
        Directory.CreateDirectory(Path.Combine(sysfs.Root, "nbd1p1"));
        Assert.Equal([0, 2, 10], NbdSysfs.ListDevices(sysfs.Root));
    }

    [Fact]
    public void ListDevices_NoSysBlock_Empty() =>
        Assert.Empty(NbdSysfs.ListDevices(Path.Combine(Path.GetTempPath(), "absent-" + Guid.NewGuid().ToString("N"))));
}

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

    /// <summary>The queue attributes the driver sets from the transmission flags (what the kernel will send the server).</summary>
    [Theory]
    [InlineData("write back", "1", "4294966784", "0", true, true, 4294966784UL, 0UL)]
    [InlineData("write through", "0", "0", "33554432", false, false, 0UL, 33554432UL)]
    public void Read_QueueAttributes_WhatTheKernelSends(string writeCache, string fua, string discard, string zeroes, bool writeBack, bool isFua, ulong discardMax, ulong zeroesMax)
    {
        using var sysfs = new FakeSysfs().Device(4, sectors: 2048, pid: 1, logicalBlockSize: 512);
        string queue = Path.Combine(sysfs.Root, "nbd4", "queue");
        File.WriteAllText(Path.Combine(queue, "write_cache"), writeCache + "\n");
        File.WriteAllText(Path.Combine(queue, "fua"), fua + "\n");
        File.WriteAllText(Path.Combine(queue, "discard_max_bytes"), discard + "\n");
        File.WriteAllText(Path.Combine(queue, "write_zeroes_max_bytes"), zeroes + "\n");

        var status = NbdSysfs.Read(4, sysfs.Root);

        Assert.Equal((writeBack, isFua, discardMax, zeroesMax), (status.WriteBack, status.Fua, status.DiscardMaxBytes, status.WriteZeroesMaxBytes));
    }

    [Fact]
    public void Read_QueueAttributesAbsent_NothingSent()
    {
        using var sysfs = new FakeSysfs().Device(4, sectors: 2048, pid: 1, logicalBlockSize: null);
        var status = NbdSysfs.Read(4, sysfs.Root);
        Assert.Equal((false, false, 0UL, 0UL), (status.WriteBack, status.Fua, status.DiscardMaxBytes, status.WriteZeroesMaxBytes));
    }

    [Fact]
    public void Read_GarbageDiscardMaxBytes_ThrowsEbadmsg()
    {
        using var sysfs = new FakeSysfs().Device(4, sectors: 2048, pid: 1, logicalBlockSize: 512);
        File.WriteAllText(Path.Combine(sysfs.Root, "nbd4", "queue", "discard_max_bytes"), "-1\n");
        var ex = Assert.Throws<NbdKernelException>(() => NbdSysfs.Read(4, sysfs.Root));
        Assert.Equal(Errno.EBADMSG, ex.Errno);
        Assert.Contains("queue/discard_max_bytes", ex.Message, StringComparison.Ordinal);
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

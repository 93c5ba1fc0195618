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

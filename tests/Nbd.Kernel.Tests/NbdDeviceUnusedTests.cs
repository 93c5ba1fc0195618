using System.Net;
using System.Net.Sockets;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel.Tests;

public sealed class NbdDeviceUnusedTests
{
    [Fact]
    public void OpenUnused_SkipsConnectedAndSized_OpensFirstFree()
    {
        using var sysfs = new FakeSysfs().Device(0, 0, pid: 100).Device(1, 8).Device(2, 0).Device(3, 0);
        var opened = new List<string>();
        using var device = NbdDevice.OpenUnused(sysfs.Root, "/dev", path => { opened.Add(path); return (new FakeNbdDeviceControl(), 0); }, 4096);
        Assert.Equal("/dev/nbd2", device.Path);
        Assert.Equal(2, device.Index);
        Assert.Equal(["/dev/nbd2"], opened);
    }

    [Fact]
    public void OpenUnused_OpenFails_TriesNext()
    {
        using var sysfs = new FakeSysfs().Device(0, 0).Device(1, 0);
        using var device = NbdDevice.OpenUnused(sysfs.Root, "/dev",
            path => path.EndsWith("nbd0", StringComparison.Ordinal) ? (null, Errno.ENXIO) : (new FakeNbdDeviceControl(), 0), 4096);
        Assert.Equal(1, device.Index);
    }

    [Fact]
    public void OpenUnused_AllBusy_ThrowsEnodev()
    {
        using var sysfs = new FakeSysfs().Device(0, 0, pid: 1).Device(1, 0, pid: 2);
        var ex = Assert.Throws<NbdKernelException>(() => NbdDevice.OpenUnused(sysfs.Root, "/dev", _ => throw new InvalidOperationException(), 4096));
        Assert.Equal(Errno.ENODEV, ex.Errno);
        Assert.Contains("all 2 nbd devices are in use", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void OpenUnused_NoDevices_ThrowsEnoentWithModprobeHint()
    {
        using var sysfs = new FakeSysfs();
        var ex = Assert.Throws<NbdKernelException>(() => NbdDevice.OpenUnused(sysfs.Root, "/dev"));
        Assert.Equal(Errno.ENOENT, ex.Errno);
        Assert.Contains("modprobe nbd", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ClaimUnused_RaceLostOnFirst_SetSockEbusy_MovesToNext()
    {
        using var sysfs = new FakeSysfs().Device(0, 0).Device(1, 0);
        var controls = new Dictionary<string, FakeNbdDeviceControl>();
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        using var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        client.Connect(listener.LocalEndPoint!);
        using var server = listener.Accept();

        using var device = NbdDevice.ClaimUnused(client, sysfs.Root, "/dev", path =>
        {
            var control = new FakeNbdDeviceControl();
            if (path.EndsWith("nbd0", StringComparison.Ordinal))
            {
                control.Errors[NbdConstants.NBD_SET_SOCK] = Errno.EBUSY; // another client's SET_SOCK got there first
            }
            controls[path] = control;
            return (control, 0);
        }, 4096);

        Assert.Equal(1, device.Index);
        Assert.True(controls["/dev/nbd0"].Disposed);
        Assert.Equal(NbdConstants.NBD_SET_SOCK, Assert.Single(controls["/dev/nbd1"].Calls).Request);
    }
}

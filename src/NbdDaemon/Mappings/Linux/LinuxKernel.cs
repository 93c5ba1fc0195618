using System.Net.Sockets;
using Nbd.Kernel;

namespace NbdDaemon.Mappings.Linux;

/// <summary><see cref="INbdKernel"/> over the real driver (<c>Nbd.Kernel</c>).</summary>
/// <param name="sysBlock">Root of the block devices in sysfs; a parameter so tests can point it at a fake tree.</param>
internal sealed class LinuxKernel(string sysBlock = "/sys/block") : INbdKernel
{
    public IIoctlDevice OpenDevice(string? path) => IoctlDevice.Open(path);

    public INbdNetlinkControl OpenNetlink() => NetlinkControl.Open();

    public IReadOnlyList<int> ListDevices() => NbdSysfs.ListDevices(sysBlock);

    public KernelDeviceInfo? ReadDevice(int index)
    {
        NbdDeviceStatus status;
        try
        {
            status = NbdSysfs.Read(index, sysBlock);
        }
        catch (NbdKernelException e) when (e.ErrnoName == "ENOENT")
        {
            return null;
        }

        return new KernelDeviceInfo(status.Index, status.SizeBytes, status.LogicalBlockSize, status.Backend, status.IsConnected, status.ReadOnly);
    }

    public void ClearSendTimeout(Socket socket) => NbdSocketTimeout.Clear(socket);

    public TimeSpan ReadSendTimeout(Socket socket) => NbdSocketTimeout.Read(socket);
}

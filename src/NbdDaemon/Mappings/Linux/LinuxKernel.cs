namespace NbdDaemon.Mappings.Linux;

/// <summary><see cref="INbdKernel"/> over the real driver (<c>Nbd.Kernel</c>).</summary>
internal sealed class LinuxKernel : INbdKernel
{
    public IIoctlDevice OpenDevice(string? path) => IoctlDevice.Open(path);

    public INbdNetlinkControl OpenNetlink() => NetlinkControl.Open();
}

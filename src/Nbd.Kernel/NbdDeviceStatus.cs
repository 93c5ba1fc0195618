namespace Nbd.Kernel;

/// <summary>
/// What sysfs says about /dev/nbdN. <paramref name="Pid"/> is the NBD_DO_IT caller (ioctl) or the netlink connecter;
/// the driver creates <c>pid</c> (and <c>backend</c>) only while the device is configured, so its presence is the
/// "connected" signal. <paramref name="LogicalBlockSize"/> is 0 when sysfs has no queue/logical_block_size.
/// </summary>
public sealed record NbdDeviceStatus(int Index, ulong SizeBytes, int? Pid, string? Backend, uint LogicalBlockSize)
{
    public bool IsConnected => Pid is not null;
}

namespace Nbd.Kernel;

/// <summary>
/// What sysfs says about /dev/nbdN. <paramref name="Pid"/> is task_pid_nr of the thread that called NBD_DO_IT (ioctl)
/// or sent NBD_CMD_CONNECT (netlink): a thread id, so for a .NET process it is not Environment.ProcessId (check
/// /proc/PID/status Tgid, or /proc/self/task/PID). The driver creates <c>pid</c> (and <c>backend</c>) when the device
/// starts and removes them only when its configuration is released (ioctl: the last descriptor closed, not merely
/// NBD_DO_IT returned), so the file's presence is the "configured/in use" signal. <paramref name="LogicalBlockSize"/> is 0 when sysfs has no queue/logical_block_size.
/// </summary>
public sealed record NbdDeviceStatus(int Index, ulong SizeBytes, int? Pid, string? Backend, uint LogicalBlockSize)
{
    public bool IsConnected => Pid is not null;

    /// <summary>
    /// Set up by some client: connected, or at least given a size. Such a device is not free to configure, since
    /// NBD_SET_BLKSIZE, SET_SIZE and SET_FLAGS have no owner check (only NBD_SET_SOCK answers EBUSY).
    /// </summary>
    public bool IsInUse => IsConnected || SizeBytes != 0;

    /// <summary>The block layer's <c>ro</c> attribute (the driver sets it from NBD_FLAG_READ_ONLY).</summary>
    public bool ReadOnly { get; init; }
}

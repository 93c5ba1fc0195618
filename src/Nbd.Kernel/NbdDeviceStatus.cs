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

    /// <summary>
    /// <c>queue/write_cache</c> is "write back": the block layer sends flushes, which the driver sends as NBD_CMD_FLUSH.
    /// The driver sets it from NBD_FLAG_SEND_FLUSH when the device starts (an admin may turn it to "write through").
    /// </summary>
    public bool WriteBack { get; init; }

    /// <summary><c>queue/fua</c> is 1: writes may carry NBD_CMD_FLAG_FUA (set from NBD_FLAG_SEND_FLUSH + NBD_FLAG_SEND_FUA).</summary>
    public bool Fua { get; init; }

    /// <summary><c>queue/discard_max_bytes</c>: above 0, discards go out as NBD_CMD_TRIM (set from NBD_FLAG_SEND_TRIM).</summary>
    public ulong DiscardMaxBytes { get; init; }

    /// <summary>
    /// <c>queue/write_zeroes_max_bytes</c>: above 0, the driver sends NBD_CMD_WRITE_ZEROES (drivers that implement it set
    /// it from NBD_FLAG_SEND_WRITE_ZEROES; the 6.1 driver never does, and leaves it 0).
    /// </summary>
    public ulong WriteZeroesMaxBytes { get; init; }
}

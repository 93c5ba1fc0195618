using Nbd.Protocol;

namespace NbdDaemon.Mappings;

/// <summary>How the reconnect policy treats a failure. Decided from the exception type, never its text.</summary>
internal enum FailureKind
{
    /// <summary>Retry with backoff (network, server restart, export temporarily changed, kernel busy).</summary>
    Transient,

    /// <summary>Retrying cannot help (e.g. TLS required but nbd:// configured); the mapping ends in Failed.</summary>
    Permanent,
}

/// <summary>A failure of one mapping with a short reason for the status line ("connection refused").</summary>
internal class MappingException : Exception
{
    public MappingException(string reason, FailureKind kind = FailureKind.Transient, Exception? inner = null)
        : base(reason, inner)
    {
        Reason = reason;
        Kind = kind;
    }

    public string Reason { get; }

    public FailureKind Kind { get; }
}

/// <summary>
/// The export came back different from the one the device was configured with. The kernel's view of the
/// device (size, writability, the commands it may send) cannot change under a mounted filesystem, so the mapping
/// refuses to resume; it keeps retrying with backoff because the usual cause is a server restarted with the wrong image.
/// </summary>
internal sealed class ExportChangedException : MappingException
{
    /// <summary>
    /// Transmission flags the driver acts on. Netlink RECONFIGURE keeps the flags given at CONNECT, so after a reconnect
    /// to an export without one the driver would go on sending FLUSH, FUA, TRIM or WRITE_ZEROES to a server that no
    /// longer offers it: a flush that may not happen, or I/O errors on discards.
    /// </summary>
    public const TransmissionFlags FlagsTheKernelUses =
        TransmissionFlags.SendFlush | TransmissionFlags.SendFua | TransmissionFlags.SendTrim | TransmissionFlags.SendWriteZeroes;

    public ExportChangedException(string reason, ExportDescription before, ExportDescription after)
        : base(reason)
    {
        Before = before;
        After = after;
    }

    public ExportDescription Before { get; }

    public ExportDescription After { get; }

    /// <summary>
    /// Why <paramref name="now"/> is not the disk <paramref name="before"/> was: another size, newly read-only (unless
    /// the mapping is read-only anyway), or without a flag in <see cref="FlagsTheKernelUses"/>; null when it is the same.
    /// </summary>
    public static ExportChangedException? Compare(ExportDescription before, ExportDescription now, bool mappingReadOnly)
    {
        var lost = (TransmissionFlags)(before.TransmissionFlags & ~now.TransmissionFlags) & FlagsTheKernelUses;
        string? reason = now.Size != before.Size ? $"export size changed from {before.Size} to {now.Size} bytes"
            : now.ReadOnly && !before.ReadOnly && !mappingReadOnly ? "export became read-only"
            : lost != 0 ? $"export no longer offers {FlagNames(lost)}, which the kernel was configured to send"
            : null;
        return reason is null ? null : new ExportChangedException(reason, before, now);
    }

    /// <summary>"NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_TRIM" for those of <see cref="FlagsTheKernelUses"/> in <paramref name="flags"/>.</summary>
    public static string FlagNames(TransmissionFlags flags) => string.Join(", ", new[]
    {
        (TransmissionFlags.SendFlush, "NBD_FLAG_SEND_FLUSH"),
        (TransmissionFlags.SendFua, "NBD_FLAG_SEND_FUA"),
        (TransmissionFlags.SendTrim, "NBD_FLAG_SEND_TRIM"),
        (TransmissionFlags.SendWriteZeroes, "NBD_FLAG_SEND_WRITE_ZEROES"),
    }.Where(f => flags.HasFlag(f.Item1)).Select(f => f.Item2));
}

/// <summary>
/// Netlink: the kernel reported the connection dead (LINK_DEAD). It holds the device's I/O for
/// DeadConnectionTimeout, so the loop reconnects at once instead of backing off.
/// </summary>
internal sealed class LinkLostException : MappingException
{
    public LinkLostException(string reason)
        : base(reason)
    {
    }
}

/// <summary>
/// A device left configured by an earlier daemon (same backend identifier) does not match the export the server
/// offers now. Adopting it would change a disk under whoever uses it, so the device is left untouched (never
/// resized, never disconnected) and the attempt is retried with backoff, like <see cref="ExportChangedException"/>.
/// </summary>
internal sealed class DeviceMismatchException : MappingException
{
    public DeviceMismatchException(string reason, KernelDeviceInfo device, ExportDescription export)
        : base(reason)
    {
        Device = device;
        Export = export;
    }

    public KernelDeviceInfo Device { get; }

    public ExportDescription Export { get; }
}

/// <summary>
/// Another process runs this mapping (it holds the mapping's lock: <c>Linux.MappingLock</c>), e.g. a daemon started by
/// hand beside the service. Nothing is touched, neither server nor device; the attempt is retried with backoff, so the
/// mapping takes over once that process ends.
/// </summary>
internal sealed class MappingInUseException : MappingException
{
    public MappingInUseException(string reason, int? holderPid)
        : base(reason)
    {
        HolderPid = holderPid;
    }

    /// <summary>The holder's pid, when /proc showed it.</summary>
    public int? HolderPid { get; }
}

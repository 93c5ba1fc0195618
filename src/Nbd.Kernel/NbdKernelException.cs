namespace Nbd.Kernel;

/// <summary>
/// A kernel request failed. Carries what a person (and the reconnect policy) needs: which device, which request,
/// and the errno. Message: "/dev/nbd0: NBD_SET_SOCK failed: EBUSY (Device or resource busy)".
/// </summary>
public class NbdKernelException : Exception
{
    public NbdKernelException(string device, string operation, int errno, string? detail = null, Exception? innerException = null)
        : base(FormatMessage(device, operation, errno, detail), innerException)
    {
        Device = device;
        Operation = operation;
        Errno = errno;
        ErrnoName = Interop.Errno.Name(errno);
        Detail = detail;
    }

    /// <summary>"/dev/nbd0", or "netlink nbd" / "netlink nbd2" for netlink requests.</summary>
    public string Device { get; }

    /// <summary>The request, e.g. "NBD_SET_SOCK", "NBD_CMD_CONNECT", "open".</summary>
    public string Operation { get; }

    /// <summary>Positive Linux errno.</summary>
    public int Errno { get; }

    /// <summary>Symbolic errno, e.g. "EBUSY".</summary>
    public string ErrnoName { get; }

    /// <summary>Extra context: the kernel's extended-ack text, or a hint such as "is the nbd module loaded?".</summary>
    public string? Detail { get; }

    private static string FormatMessage(string device, string operation, int errno, string? detail)
    {
        string text = $"{device}: {operation} failed: {Interop.Errno.Name(errno)} ({Interop.Errno.Describe(errno)})";
        return detail is null ? text : $"{text}: {detail}";
    }
}

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
/// device (size, writability) cannot change under a mounted filesystem, so the mapping refuses to resume;
/// it keeps retrying with backoff because the usual cause is a server restarted with the wrong image.
/// </summary>
internal sealed class ExportChangedException : MappingException
{
    public ExportChangedException(string reason, ExportDescription before, ExportDescription after)
        : base(reason)
    {
        Before = before;
        After = after;
    }

    public ExportDescription Before { get; }

    public ExportDescription After { get; }
}

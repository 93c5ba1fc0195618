namespace Nbd.Protocol;

/// <summary>
/// Base of every failure the NBD client raises. <see cref="Server"/> and <see cref="ExportName"/> are filled in by
/// <see cref="NbdClient"/> so a log line names what failed without the caller re-attaching context.
/// </summary>
public class NbdException : Exception
{
    public NbdException() { }

    public NbdException(string message) : base(message) { }

    public NbdException(string message, Exception? innerException) : base(message, innerException) { }

    /// <summary>The server (host:port or unix socket path) when known.</summary>
    public string? Server { get; internal set; }

    /// <summary>The export asked for when known.</summary>
    public string? ExportName { get; internal set; }

    /// <summary>What went wrong, without the server and export <see cref="Message"/> adds: for a line that names them already.</summary>
    public string Detail => base.Message;

    public override string Message
    {
        get
        {
            if (Server is null && ExportName is null)
            {
                return base.Message;
            }

            return $"{base.Message} (server {Server ?? "?"}, export '{ExportName ?? ""}')";
        }
    }
}

/// <summary>Why the server's bytes violate the protocol.</summary>
public enum NbdProtocolError
{
    /// <summary>A magic number did not match.</summary>
    BadMagic,
    /// <summary>The stream ended inside a message.</summary>
    Truncated,
    /// <summary>A reply type or option echo the client did not expect at this point.</summary>
    UnexpectedReply,
    /// <summary>A length beyond what the spec or this client allows; refused before allocating.</summary>
    OversizedLength,
    /// <summary>A field with a value the spec forbids (bad UTF-8, invalid block sizes, wrong info length...).</summary>
    InvalidValue,
    /// <summary>The server's negotiation style cannot do what was asked (e.g. NBD_OPT_LIST on an oldstyle server).</summary>
    Unsupported,
}

/// <summary>The server sent something the protocol does not allow; the connection is unusable.</summary>
public sealed class NbdProtocolException : NbdException
{
    public NbdProtocolException(NbdProtocolError error, string message) : base(message) => Error = error;

    public NbdProtocolException(NbdProtocolError error, string message, Exception? innerException)
        : base(message, innerException) => Error = error;

    public NbdProtocolError Error { get; }
}

/// <summary>The server answered an option with an NBD_REP_ERR_* reply.</summary>
public class NbdServerErrorException : NbdException
{
    public NbdServerErrorException(NbdOption option, NbdReplyType replyType, string? serverMessage)
        : base(Describe(option, replyType, serverMessage))
    {
        Option = option;
        ReplyType = replyType;
        ServerMessage = serverMessage;
    }

    /// <summary>The option the server refused.</summary>
    public NbdOption Option { get; }

    /// <summary>The error reply code (may be a value this client does not know; bit 31 is always set).</summary>
    public NbdReplyType ReplyType { get; }

    /// <summary>The reply's name in proto.md ("NBD_REP_ERR_UNKNOWN"), or "reply 0x…" for one this client does not know.</summary>
    public string ReplyTypeName => ReplyName(ReplyType);

    /// <summary>The human-readable message the server attached, if any, as sent (<see cref="NbdText.Printable"/> before printing it).</summary>
    public string? ServerMessage { get; }

    internal static string ReplyName(NbdReplyType type) => type switch
    {
        NbdReplyType.Ack => "NBD_REP_ACK",
        NbdReplyType.Server => "NBD_REP_SERVER",
        NbdReplyType.Info => "NBD_REP_INFO",
        NbdReplyType.MetaContext => "NBD_REP_META_CONTEXT",
        NbdReplyType.ErrUnsup => "NBD_REP_ERR_UNSUP",
        NbdReplyType.ErrPolicy => "NBD_REP_ERR_POLICY",
        NbdReplyType.ErrInvalid => "NBD_REP_ERR_INVALID",
        NbdReplyType.ErrPlatform => "NBD_REP_ERR_PLATFORM",
        NbdReplyType.ErrTlsReqd => "NBD_REP_ERR_TLS_REQD",
        NbdReplyType.ErrUnknown => "NBD_REP_ERR_UNKNOWN",
        NbdReplyType.ErrShutdown => "NBD_REP_ERR_SHUTDOWN",
        NbdReplyType.ErrBlockSizeReqd => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        NbdReplyType.ErrTooBig => "NBD_REP_ERR_TOO_BIG",
        NbdReplyType.ErrExtHeaderReqd => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => $"reply 0x{(uint)type:x8}",
    };

    internal static string OptionName(NbdOption option) => option switch
    {
        NbdOption.ExportName => "NBD_OPT_EXPORT_NAME",
        NbdOption.Abort => "NBD_OPT_ABORT",
        NbdOption.List => "NBD_OPT_LIST",
        NbdOption.StartTls => "NBD_OPT_STARTTLS",
        NbdOption.Info => "NBD_OPT_INFO",
        NbdOption.Go => "NBD_OPT_GO",
        _ => $"option {(uint)option}",
    };

    private static string Describe(NbdOption option, NbdReplyType type, string? message) =>
        string.IsNullOrEmpty(message)
            ? $"Server answered {OptionName(option)} with {ReplyName(type)}."
            : $"Server answered {OptionName(option)} with {ReplyName(type)}: {NbdText.Printable(message)}";
}

/// <summary>The server answered NBD_REP_ERR_TLS_REQD: it will not go on (with this export) without TLS.</summary>
public sealed class NbdTlsRequiredException : NbdServerErrorException
{
    public NbdTlsRequiredException(NbdOption option, string? serverMessage)
        : base(option, NbdReplyType.ErrTlsReqd, serverMessage) { }
}

/// <summary>
/// TLS was asked for (nbds:// or nbds+unix://) but this client cannot run a TLS session yet. Raised after the
/// NBD_OPT_STARTTLS exchange so the message can say what the server offered; the connection is then dropped
/// (a hard disconnect is what the spec asks for when TLS cannot be set up after an ACK).
/// </summary>
public sealed class NbdTlsNotSupportedException : NbdException
{
    public NbdTlsNotSupportedException(string message, bool serverAcceptedStartTls, Exception? innerException = null)
        : base(message, innerException) => ServerAcceptedStartTls = serverAcceptedStartTls;

    /// <summary>True when the server answered NBD_OPT_STARTTLS with NBD_REP_ACK.</summary>
    public bool ServerAcceptedStartTls { get; }
}

/// <summary>Which bound ran out.</summary>
public enum NbdTimeoutPhase
{
    Connect,
    Handshake,
}

/// <summary>The server did not connect or finish the handshake in time.</summary>
public sealed class NbdTimeoutException : NbdException
{
    /// <param name="phase">Which bound ran out.</param>
    /// <param name="timeout">Its length.</param>
    /// <param name="innerException">The cancellation or socket timeout.</param>
    /// <param name="awaiting">What the handshake was waiting for when it ran out ("the server greeting …"), if known.</param>
    public NbdTimeoutException(NbdTimeoutPhase phase, TimeSpan timeout, Exception? innerException = null, string? awaiting = null)
        : base($"{(phase == NbdTimeoutPhase.Connect ? "Connecting" : "Handshake")} timed out after {timeout.TotalMilliseconds:0} ms{(awaiting is null ? "" : " waiting for " + awaiting)}.", innerException)
    {
        Phase = phase;
        Timeout = timeout;
        Awaiting = awaiting;
    }

    public NbdTimeoutPhase Phase { get; }

    public TimeSpan Timeout { get; }

    /// <summary>
    /// What the handshake was reading or sending when its time ran out, e.g. "the server greeting (NBDMAGIC + magic)":
    /// a server that accepted the connection and never sent its greeting is no NBD server, or a stuck one. Null for
    /// <see cref="NbdTimeoutPhase.Connect"/>.
    /// </summary>
    public string? Awaiting { get; }

    /// <summary>True when the connection was accepted and not one byte of the greeting came.</summary>
    public bool NoGreeting { get; init; }
}

/// <summary>
/// The caller cancelled a handshake (its own deadline, e.g. a daemon's per-attempt Timeout, or a stop): says what the
/// handshake was waiting for, so that "no NBD greeting came" can be told from a later stall. A cancellation, not a
/// failure: it derives from <see cref="OperationCanceledException"/>.
/// </summary>
public sealed class NbdHandshakeCanceledException : OperationCanceledException
{
    public NbdHandshakeCanceledException(string? awaiting, bool noGreeting, Exception innerException, CancellationToken token)
        : base($"The handshake was cancelled{(awaiting is null ? "" : " waiting for " + awaiting)}.", innerException, token)
    {
        Awaiting = awaiting;
        NoGreeting = noGreeting;
    }

    /// <summary>What the handshake was reading or sending, as <see cref="NbdTimeoutException.Awaiting"/>.</summary>
    public string? Awaiting { get; }

    /// <summary>True when the connection was accepted and not one byte of the greeting came.</summary>
    public bool NoGreeting { get; }
}

/// <summary>The TCP or unix-socket connection could not be established (or the host name did not resolve).</summary>
public sealed class NbdConnectException : NbdException
{
    /// <param name="endPoint">The server as the URI named it: host:port, or unix:PATH.</param>
    /// <param name="innerException">The connect failure.</param>
    /// <param name="reason">What went wrong in words, when the socket error's own text would mislead (see <see cref="Reason"/>).</param>
    public NbdConnectException(string endPoint, System.Net.Sockets.SocketException innerException, string? reason = null)
        : base(reason is null
            ? $"Cannot connect to {endPoint}: {innerException.SocketErrorCode} ({innerException.Message})."
            : $"Cannot connect to {endPoint}: {reason}.", innerException)
    {
        EndPoint = endPoint;
        SocketError = innerException.SocketErrorCode;
        Reason = reason;
    }

    public string EndPoint { get; }

    /// <summary>
    /// The failure in words, where .NET's own would mislead: connect(2) to a unix socket path that does not exist fails
    /// with ENOENT, which .NET reports as AddressNotAvailable, "Cannot assign requested address". Null otherwise.
    /// </summary>
    public string? Reason { get; }

    public System.Net.Sockets.SocketError SocketError { get; }
}

namespace Nbd.Protocol;

/// <summary>Constants of the NBD wire protocol (doc/proto.md of NetworkBlockDevice/nbd).</summary>
public static class NbdProtocol
{
    /// <summary>The IANA-assigned NBD port.</summary>
    public const int DefaultPort = 10809;

    /// <summary>proto.md "Conventions": a string MUST be no longer than 4096 bytes (export names, messages).</summary>
    public const int MaxStringLength = 4096;
}

/// <summary>Option types (proto.md "Values / Option types").</summary>
public enum NbdOption : uint
{
    ExportName = 1,
    Abort = 2,
    List = 3,
    PeekExport = 4,
    StartTls = 5,
    Info = 6,
    Go = 7,
    StructuredReply = 8,
    ListMetaContext = 9,
    SetMetaContext = 10,
    ExtendedHeaders = 11,
}

/// <summary>Option reply types (proto.md "Option reply types"). Errors have bit 31 set.</summary>
public enum NbdReplyType : uint
{
    Ack = 1,
    Server = 2,
    Info = 3,
    MetaContext = 4,
    ErrUnsup = 0x8000_0001,
    ErrPolicy = 0x8000_0002,
    ErrInvalid = 0x8000_0003,
    ErrPlatform = 0x8000_0004,
    ErrTlsReqd = 0x8000_0005,
    ErrUnknown = 0x8000_0006,
    ErrShutdown = 0x8000_0007,
    ErrBlockSizeReqd = 0x8000_0008,
    ErrTooBig = 0x8000_0009,
    ErrExtHeaderReqd = 0x8000_000A,
}

/// <summary>Transmission flags (proto.md "Transmission flags"), 16 bits sent after option haggling.</summary>
[Flags]
#pragma warning disable CA1028 // the wire field is 16 bits; the kernel's NBD_SET_FLAGS takes the same bits.
public enum TransmissionFlags : ushort
#pragma warning restore CA1028
{
    None = 0,
    HasFlags = 1 << 0,
    ReadOnly = 1 << 1,
    SendFlush = 1 << 2,
    SendFua = 1 << 3,
    Rotational = 1 << 4,
    SendTrim = 1 << 5,
    SendWriteZeroes = 1 << 6,
    SendDf = 1 << 7,
    CanMultiConn = 1 << 8,
    SendResize = 1 << 9,
    SendCache = 1 << 10,
    SendFastZero = 1 << 11,
    BlockStatusPayload = 1 << 12,
}

/// <summary>Information types carried by NBD_REP_INFO (proto.md "NBD_REP_INFO").</summary>
internal enum NbdInfoType : ushort
{
    Export = 0,
    Name = 1,
    Description = 2,
    BlockSize = 3,
}

/// <summary>Handshake flags sent by the server (proto.md "Handshake flags").</summary>
[Flags]
internal enum HandshakeFlags : ushort
{
    None = 0,
    FixedNewstyle = 1 << 0,
    NoZeroes = 1 << 1,
}

/// <summary>Client flags (proto.md "Client flags").</summary>
[Flags]
internal enum ClientFlags : uint
{
    None = 0,
    FixedNewstyle = 1 << 0,
    NoZeroes = 1 << 1,
}

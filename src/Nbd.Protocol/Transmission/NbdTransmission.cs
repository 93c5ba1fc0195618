using System.Buffers.Binary;

namespace Nbd.Protocol.Transmission;

/// <summary>
/// The transmission phase's fixed-size messages as the Linux driver speaks them (proto.md "Transmission"): simple
/// replies only, because the kernel never negotiates structured replies or extended headers.
/// <code>
///   request (28 bytes)                          simple reply (16 bytes)
///   0  u32 magic 0x25609513                     0  u32 magic 0x67446698
///   4  u16 command flags                        4  u32 error (errno value, 0 = success)
///   6  u16 type                                 8  u64 cookie
///   8  u64 cookie                               then, for a successful NBD_CMD_READ only,
///   16 u64 offset                               exactly `length` bytes of the request
///   24 u32 length
///   then, for NBD_CMD_WRITE only, `length` bytes
/// </code>
/// </summary>
public static class NbdTransmission
{
    public const uint RequestMagic = 0x25609513;
    public const uint SimpleReplyMagic = 0x67446698;
    public const uint StructuredReplyMagic = 0x668e33ef;
    public const int RequestLength = 28;
    public const int SimpleReplyLength = 16;

    /// <summary>
    /// NBD_ESHUTDOWN (proto.md "Error values"): the server is shutting down and did not carry the request out. The client
    /// "MUST initiate a soft disconnect" (proto.md "Terminating the transmission phase").
    /// </summary>
    public const uint ErrorShutdown = 108;

    /// <summary>
    /// The largest data length of one request the Linux driver sends: max_hw_sectors is 65536 sectors of 512 bytes
    /// (drivers/block/nbd.c). A longer request is refused before any buffer is allocated.
    /// </summary>
    public const int MaxDataLength = 65536 * 512;

    private const int MagicOffset = 0;
    private const int FlagsOffset = 4;
    private const int TypeOffset = 6;
    private const int CookieOffset = 8;
    private const int OffsetOffset = 16;
    private const int LengthOffset = 24;
    private const int ErrorOffset = 4;

    internal static NbdRequestHeader ReadRequest(ReadOnlySpan<byte> header) => new(
        BinaryPrimitives.ReadUInt32BigEndian(header[MagicOffset..]),
        BinaryPrimitives.ReadUInt16BigEndian(header[FlagsOffset..]),
        (NbdCommand)BinaryPrimitives.ReadUInt16BigEndian(header[TypeOffset..]),
        BinaryPrimitives.ReadUInt64BigEndian(header[CookieOffset..]),
        BinaryPrimitives.ReadUInt64BigEndian(header[OffsetOffset..]),
        BinaryPrimitives.ReadUInt32BigEndian(header[LengthOffset..]));

    internal static void WriteRequest(Span<byte> header, NbdCommand type, ulong cookie, ulong offset = 0, uint length = 0, ushort flags = 0)
    {
        BinaryPrimitives.WriteUInt32BigEndian(header[MagicOffset..], RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(header[FlagsOffset..], flags);
        BinaryPrimitives.WriteUInt16BigEndian(header[TypeOffset..], (ushort)type);
        BinaryPrimitives.WriteUInt64BigEndian(header[CookieOffset..], cookie);
        BinaryPrimitives.WriteUInt64BigEndian(header[OffsetOffset..], offset);
        BinaryPrimitives.WriteUInt32BigEndian(header[LengthOffset..], length);
    }

    internal static NbdSimpleReplyHeader ReadReply(ReadOnlySpan<byte> header) => new(
        BinaryPrimitives.ReadUInt32BigEndian(header[MagicOffset..]),
        BinaryPrimitives.ReadUInt32BigEndian(header[ErrorOffset..]),
        BinaryPrimitives.ReadUInt64BigEndian(header[CookieOffset..]));
}

/// <summary>Request types (proto.md "Request types").</summary>
#pragma warning disable CA1028 // the wire field is 16 bits
public enum NbdCommand : ushort
#pragma warning restore CA1028
{
    Read = 0,
    Write = 1,
    Disconnect = 2,
    Flush = 3,
    Trim = 4,
    Cache = 5,
    WriteZeroes = 6,
    BlockStatus = 7,
    Resize = 8,
}

internal readonly record struct NbdRequestHeader(uint Magic, ushort Flags, NbdCommand Type, ulong Cookie, ulong Offset, uint Length);

internal readonly record struct NbdSimpleReplyHeader(uint Magic, uint Error, ulong Cookie);

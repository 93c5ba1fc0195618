using System.Buffers.Binary;
using System.Text;
using System.Text.Unicode;

namespace Nbd.Protocol;

/// <summary>
/// Pure encoders and decoders of handshake messages (doc/proto.md "Handshake" and "Values"). Nothing here does
/// I/O, so every message is testable as bytes. All integers are big-endian ("network byte order").
/// </summary>
internal static class NbdWire
{
    /// <summary>'NBDMAGIC', the INIT_PASSWD every handshake starts with.</summary>
    public const ulong InitPasswd = 0x4e42444d41474943;

    /// <summary>cliserv_magic: second magic of the oldstyle handshake.</summary>
    public const ulong OldstyleMagic = 0x00420281861253;

    /// <summary>'IHAVEOPT': second magic of newstyle, and the prefix of every option the client sends.</summary>
    public const ulong IHaveOpt = 0x49484156454F5054;

    /// <summary>Magic of every fixed-newstyle option reply.</summary>
    public const ulong OptionReplyMagic = 0x3e889045565a9;

    /// <summary>Bound on an option reply payload whose type has no tighter limit (NBD_REP_INFO of unknown type).</summary>
    public const int MaxOptionReplyLength = 64 * 1024;

    /// <summary>Bound on INFO replies for one NBD_OPT_INFO/GO: four are defined; this leaves room and stops a flood.</summary>
    public const int MaxInfoReplies = 1024;

    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    // ---- Initial greeting -------------------------------------------------------------------------------------
    //
    //  S: 64 bits 'NBDMAGIC'
    //  S: 64 bits 'IHAVEOPT' (newstyle) | 0x00420281861253 (oldstyle)
    //  newstyle:  S: 16 bits handshake flags          C: 32 bits client flags
    //  oldstyle:  S: 64 bits size, 32 bits flags, 124 bytes zeroes
    public const int GreetingLength = 16;
    public const int HandshakeFlagsLength = 2;
    public const int ClientFlagsLength = 4;

    public const int OldstyleRestLength = 8 + 4 + 124;
    private const int OldstyleSizeOffset = 0;
    private const int OldstyleFlagsOffset = 8;

    /// <summary>Returns true for newstyle, false for oldstyle; throws on any other magic.</summary>
    public static bool ParseGreeting(ReadOnlySpan<byte> greeting)
    {
        ulong passwd = BinaryPrimitives.ReadUInt64BigEndian(greeting);
        if (passwd != InitPasswd)
        {
            throw new NbdProtocolException(NbdProtocolError.BadMagic, $"Server greeting starts with 0x{passwd:x16}, not 'NBDMAGIC'; this is not an NBD server.");
        }

        ulong magic = BinaryPrimitives.ReadUInt64BigEndian(greeting[8..]);
        return magic switch
        {
            IHaveOpt => true,
            OldstyleMagic => false,
            _ => throw new NbdProtocolException(NbdProtocolError.BadMagic, $"Server greeting has magic 0x{magic:x16}, neither 'IHAVEOPT' (newstyle) nor 0x00420281861253 (oldstyle)."),
        };
    }

    /// <summary>
    /// Client flags in reply to the server's handshake flags: echo FIXED_NEWSTYLE and NO_ZEROES when offered,
    /// nothing else ("Clients MUST NOT set any other flags"). Unknown server flags are ignored.
    /// </summary>
    public static ClientFlags ChooseClientFlags(HandshakeFlags server)
    {
        var flags = ClientFlags.None;
        if (server.HasFlag(HandshakeFlags.FixedNewstyle))
        {
            flags |= ClientFlags.FixedNewstyle;
        }

        if (server.HasFlag(HandshakeFlags.NoZeroes))
        {
            flags |= ClientFlags.NoZeroes;
        }

        return flags;
    }

    public static void WriteClientFlags(Span<byte> destination, ClientFlags flags) =>
        BinaryPrimitives.WriteUInt32BigEndian(destination, (uint)flags);

    /// <summary>Oldstyle: size (64) + flags (32, of which the low 16 are transmission flags) + 124 reserved bytes.</summary>
    public static (ulong Size, TransmissionFlags Flags) ParseOldstyleRest(ReadOnlySpan<byte> rest)
    {
        ulong size = BinaryPrimitives.ReadUInt64BigEndian(rest[OldstyleSizeOffset..]);
        uint flags = BinaryPrimitives.ReadUInt32BigEndian(rest[OldstyleFlagsOffset..]);
        return (size, (TransmissionFlags)(ushort)flags);
    }

    // ---- Option request ---------------------------------------------------------------------------------------
    //
    //  C: 64 bits 'IHAVEOPT'
    //  C: 32 bits option
    //  C: 32 bits length of option data
    //  C: option data
    public const int OptionHeaderLength = 16;

    public static byte[] BuildOption(NbdOption option, ReadOnlySpan<byte> data)
    {
        var message = new byte[OptionHeaderLength + data.Length];
        BinaryPrimitives.WriteUInt64BigEndian(message, IHaveOpt);
        BinaryPrimitives.WriteUInt32BigEndian(message.AsSpan(8), (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(message.AsSpan(12), (uint)data.Length);
        data.CopyTo(message.AsSpan(OptionHeaderLength));
        return message;
    }

    /// <summary>NBD_OPT_EXPORT_NAME: the data is the bare name.</summary>
    public static byte[] BuildExportName(string exportName) => BuildOption(NbdOption.ExportName, EncodeName(exportName));

    // NBD_OPT_INFO / NBD_OPT_GO data:
    //  32 bits length of name, name, 16 bits number of information requests, 16 bits x n requests
    public static byte[] BuildInfoRequest(NbdOption option, string exportName, ReadOnlySpan<NbdInfoType> requests)
    {
        byte[] name = EncodeName(exportName);
        var data = new byte[4 + name.Length + 2 + (2 * requests.Length)];
        BinaryPrimitives.WriteUInt32BigEndian(data, (uint)name.Length);
        name.CopyTo(data.AsSpan(4));
        int at = 4 + name.Length;
        BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(at), (ushort)requests.Length);
        at += 2;
        foreach (var request in requests)
        {
            BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(at), (ushort)request);
            at += 2;
        }

        return BuildOption(option, data);
    }

    private static byte[] EncodeName(string exportName)
    {
        byte[] name = Encoding.UTF8.GetBytes(exportName);
        if (name.Length > NbdProtocol.MaxStringLength || exportName.Contains('\0', StringComparison.Ordinal))
        {
            throw new ArgumentException($"Export names are at most {NbdProtocol.MaxStringLength} UTF-8 bytes without NUL.", nameof(exportName));
        }

        return name;
    }

    // ---- Option reply (fixed newstyle) ------------------------------------------------------------------------
    //
    //  S: 64 bits 0x3e889045565a9
    //  S: 32 bits option being replied to
    //  S: 32 bits reply type
    //  S: 32 bits length of reply data
    //  S: reply data
    public const int OptionReplyHeaderLength = 20;
    private const int ReplyOptionOffset = 8;
    private const int ReplyTypeOffset = 12;
    private const int ReplyLengthOffset = 16;

    public readonly record struct OptionReplyHeader(NbdOption Option, NbdReplyType Type, uint Length);

    public static OptionReplyHeader ParseOptionReplyHeader(ReadOnlySpan<byte> header)
    {
        ulong magic = BinaryPrimitives.ReadUInt64BigEndian(header);
        if (magic != OptionReplyMagic)
        {
            throw new NbdProtocolException(NbdProtocolError.BadMagic, $"Option reply has magic 0x{magic:x16}, not 0x0003e889045565a9.");
        }

        return new OptionReplyHeader(
            (NbdOption)BinaryPrimitives.ReadUInt32BigEndian(header[ReplyOptionOffset..]),
            (NbdReplyType)BinaryPrimitives.ReadUInt32BigEndian(header[ReplyTypeOffset..]),
            BinaryPrimitives.ReadUInt32BigEndian(header[ReplyLengthOffset..]));
    }

    public static bool IsError(NbdReplyType type) => ((uint)type & 0x8000_0000) != 0;

    /// <summary>
    /// The largest payload this client accepts for a reply type, checked before anything is read:
    /// ACK carries nothing; error messages and INFO strings are spec strings (4096); SERVER is a name plus a
    /// description string.
    /// </summary>
    public static uint MaxPayloadLength(NbdReplyType type) => type switch
    {
        NbdReplyType.Ack => 0,
        NbdReplyType.Server => 4 + (2 * NbdProtocol.MaxStringLength),
        NbdReplyType.Info => MaxOptionReplyLength,
        _ when IsError(type) => NbdProtocol.MaxStringLength,
        _ => MaxOptionReplyLength,
    };

    /// <summary>Text for people (error messages, export descriptions): decoded leniently, NULs dropped; null when empty.</summary>
    public static string? DecodeTextForPeople(ReadOnlySpan<byte> payload) =>
        payload.IsEmpty ? null : Encoding.UTF8.GetString(payload).Replace("\0", "", StringComparison.Ordinal);

    // NBD_REP_SERVER data:  32 bits length of name, name, rest = description (human-readable).
    public static NbdExportListing ParseServerReply(ReadOnlySpan<byte> payload)
    {
        if (payload.Length < 4)
        {
            throw new NbdProtocolException(NbdProtocolError.InvalidValue, $"NBD_REP_SERVER reply of {payload.Length} bytes is shorter than its 4-byte name length.");
        }

        uint nameLength = BinaryPrimitives.ReadUInt32BigEndian(payload);
        if (nameLength > (uint)(payload.Length - 4) || nameLength > NbdProtocol.MaxStringLength)
        {
            throw new NbdProtocolException(NbdProtocolError.OversizedLength, $"NBD_REP_SERVER name length {nameLength} exceeds its {payload.Length}-byte reply or {NbdProtocol.MaxStringLength}.");
        }

        ReadOnlySpan<byte> nameBytes = payload.Slice(4, (int)nameLength);
        var rest = payload[(4 + (int)nameLength)..];
        if (rest.Length > NbdProtocol.MaxStringLength)
        {
            throw new NbdProtocolException(NbdProtocolError.OversizedLength, $"NBD_REP_SERVER description of {rest.Length} bytes exceeds {NbdProtocol.MaxStringLength}.");
        }

        // One entry that is not a spec string is listed as such instead of failing the whole listing: the lengths
        // framed it, so the rest of the stream is intact.
        bool valid = !nameBytes.Contains((byte)0) && Utf8.IsValid(nameBytes);
        return new NbdExportListing(Encoding.UTF8.GetString(nameBytes), DecodeTextForPeople(rest))
        {
            NameIsValid = valid,
        };
    }

    // NBD_REP_INFO data:  16 bits information type, then per type:
    //  NBD_INFO_EXPORT (0):      64 bits size, 16 bits transmission flags          (length MUST be 12)
    //  NBD_INFO_NAME (1):        string                                            (length >= 2)
    //  NBD_INFO_DESCRIPTION (2): string                                            (length >= 2)
    //  NBD_INFO_BLOCK_SIZE (3):  32 bits minimum, 32 bits preferred, 32 bits max  (length MUST be 14)
    public const int InfoExportLength = 12;
    public const int InfoBlockSizeLength = 14;

    /// <summary>Accumulates NBD_REP_INFO items of one NBD_OPT_INFO/GO.</summary>
    public sealed class InfoBuilder
    {
        public ulong? Size { get; set; }
        public TransmissionFlags Flags { get; set; }
        public string? Name { get; set; }
        public string? Description { get; set; }
        public BlockSizeConstraints? BlockSizes { get; set; }

        public NbdExportInfo Build(string requestedName, NbdOption option) =>
            Size is ulong size
                ? new NbdExportInfo(Name ?? requestedName, size, Flags, BlockSizes, Description)
                : throw new NbdProtocolException(NbdProtocolError.UnexpectedReply, $"Server acknowledged {NbdServerErrorException.OptionName(option)} without sending NBD_INFO_EXPORT.");
    }

    public static void ParseInfo(ReadOnlySpan<byte> payload, InfoBuilder info)
    {
        if (payload.Length < 2)
        {
            throw new NbdProtocolException(NbdProtocolError.InvalidValue, $"NBD_REP_INFO reply of {payload.Length} bytes has no information type.");
        }

        var type = (NbdInfoType)BinaryPrimitives.ReadUInt16BigEndian(payload);
        var body = payload[2..];
        switch (type)
        {
            case NbdInfoType.Export:
                RequireLength(payload, InfoExportLength, "NBD_INFO_EXPORT");
                info.Size = BinaryPrimitives.ReadUInt64BigEndian(body);
                info.Flags = RequireHasFlags((TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(body[8..]), "NBD_INFO_EXPORT");
                break;
            case NbdInfoType.Name:
                info.Name = DecodeString(CheckStringLength(body, "NBD_INFO_NAME"), "NBD_INFO_NAME");
                break;
            case NbdInfoType.Description:
                info.Description = DecodeString(CheckStringLength(body, "NBD_INFO_DESCRIPTION"), "NBD_INFO_DESCRIPTION");
                break;
            case NbdInfoType.BlockSize:
                RequireLength(payload, InfoBlockSizeLength, "NBD_INFO_BLOCK_SIZE");
                info.BlockSizes = ValidateBlockSizes(
                    BinaryPrimitives.ReadUInt32BigEndian(body),
                    BinaryPrimitives.ReadUInt32BigEndian(body[4..]),
                    BinaryPrimitives.ReadUInt32BigEndian(body[8..]));
                break;
            default:
                // "The client MUST ignore information replies it does not understand."
                break;
        }
    }

    /// <summary>proto.md "Size constraints": the rules a server's advertised values MUST meet.</summary>
    public static BlockSizeConstraints ValidateBlockSizes(uint minimum, uint preferred, uint maximum)
    {
        if (minimum == 0 || !uint.IsPow2(minimum) || minimum > 65536)
        {
            throw new NbdProtocolException(NbdProtocolError.InvalidValue, $"Minimum block size {minimum} is not a power of 2 from 1 to 65536.");
        }

        if (!uint.IsPow2(preferred) || preferred < Math.Max(minimum, 512u))
        {
            throw new NbdProtocolException(NbdProtocolError.InvalidValue, $"Preferred block size {preferred} is not a power of 2 at least max(minimum {minimum}, 512).");
        }

        if (maximum < preferred)
        {
            throw new NbdProtocolException(NbdProtocolError.InvalidValue, $"Maximum payload size {maximum} is smaller than the preferred block size {preferred}.");
        }

        return new BlockSizeConstraints(minimum, preferred, maximum);
    }

    private static void RequireLength(ReadOnlySpan<byte> payload, int expected, string what)
    {
        if (payload.Length != expected)
        {
            throw new NbdProtocolException(NbdProtocolError.InvalidValue, $"{what} reply is {payload.Length} bytes; the spec requires {expected}.");
        }
    }

    private static ReadOnlySpan<byte> CheckStringLength(ReadOnlySpan<byte> body, string what) =>
        body.Length <= NbdProtocol.MaxStringLength
            ? body
            : throw new NbdProtocolException(NbdProtocolError.OversizedLength, $"{what} string of {body.Length} bytes exceeds {NbdProtocol.MaxStringLength}.");

    /// <summary>Spec strings: UTF-8 without NUL.</summary>
    public static string DecodeString(ReadOnlySpan<byte> bytes, string what)
    {
        if (bytes.Contains((byte)0))
        {
            throw new NbdProtocolException(NbdProtocolError.InvalidValue, $"{what} contains NUL.");
        }

        try
        {
            return StrictUtf8.GetString(bytes);
        }
        catch (DecoderFallbackException ex)
        {
            throw new NbdProtocolException(NbdProtocolError.InvalidValue, $"{what} is not valid UTF-8.", ex);
        }
    }

    // ---- NBD_OPT_EXPORT_NAME reply ----------------------------------------------------------------------------
    //
    //  S: 64 bits size, 16 bits transmission flags, 124 bytes zeroes unless NBD_FLAG_C_NO_ZEROES was negotiated
    public const int ExportNameReplyLength = 10;
    public const int ReservedZeroesLength = 124;

    public static (ulong Size, TransmissionFlags Flags) ParseExportNameReply(ReadOnlySpan<byte> reply) =>
        (BinaryPrimitives.ReadUInt64BigEndian(reply), RequireHasFlags((TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(reply[8..]), "NBD_OPT_EXPORT_NAME reply"));

    /// <summary>
    /// proto.md: NBD_FLAG_HAS_FLAGS "MUST always be 1" in the transmission flags. Refused as libnbd refuses them: when
    /// they are all zero, which is what bytes that are no export's description give (a server answering another
    /// option there: the reply magic's size, then the option number's high bytes); their "size" would otherwise become
    /// the device's. Other flags without the bit are taken, as libnbd takes them. (The oldstyle handshake is not
    /// checked: servers before the flags field sent zeroes there.)
    /// </summary>
    private static TransmissionFlags RequireHasFlags(TransmissionFlags flags, string what) =>
        flags != TransmissionFlags.None
            ? flags
            : throw new NbdProtocolException(NbdProtocolError.InvalidValue, $"{what} has transmission flags 0x0000, without NBD_FLAG_HAS_FLAGS, which proto.md requires: not an export's description.");
}

using System.Buffers.Binary;
using System.Text;
using Nbd.Protocol;

namespace Nbd.Fuzz;

/// <summary>
/// Writes what an NBD server sends during the handshake (doc/proto.md "Handshake"), message by message, and
/// remembers where each message and each magic, length and size field sits, so the mutator can aim at them.
/// </summary>
internal sealed class ServerWriter
{
    public const ulong NbdMagic = 0x4e42444d41474943;
    public const ulong IHaveOpt = 0x49484156454F5054;
    public const ulong OldstyleMagic = 0x00420281861253;
    public const ulong ReplyMagic = 0x3e889045565a9;

    private readonly List<byte> _bytes = new(256);

    /// <summary>[start, end) of every message, in order.</summary>
    public List<(int Start, int End)> Messages { get; } = [];

    /// <summary>Offsets of 32-bit length fields (option reply lengths, name lengths inside NBD_REP_SERVER).</summary>
    public List<int> LengthFields { get; } = [];

    /// <summary>Offsets of 64-bit magic numbers.</summary>
    public List<int> MagicFields { get; } = [];

    /// <summary>Offsets of 64-bit export sizes.</summary>
    public List<int> SizeFields { get; } = [];

    public int Length => _bytes.Count;

    public byte[] ToArray() => [.. _bytes];

    // ---- Greetings --------------------------------------------------------------------------------------------

    /// <summary>Oldstyle: NBDMAGIC, cliserv_magic, 64-bit size, 32-bit flags, 124 zeroes.</summary>
    public ServerWriter Oldstyle(ulong size, uint flags)
    {
        int start = Length;
        Magic(NbdMagic).Magic(OldstyleMagic).Size(size).U32(flags).Zeroes(124);
        return End(start);
    }

    /// <summary>Newstyle: NBDMAGIC, IHAVEOPT, 16-bit handshake flags (bit 0 FIXED_NEWSTYLE, bit 1 NO_ZEROES).</summary>
    public ServerWriter Newstyle(ushort handshakeFlags)
    {
        int start = Length;
        Magic(NbdMagic).Magic(IHaveOpt).U16(handshakeFlags);
        return End(start);
    }

    // ---- Option replies (fixed newstyle): magic, option, type, length, data ----------------------------------

    public ServerWriter Reply(NbdOption option, NbdReplyType type, ReadOnlySpan<byte> payload)
    {
        int start = Length;
        Magic(ReplyMagic).U32((uint)option).U32((uint)type);
        LengthFields.Add(Length);
        U32((uint)payload.Length).Raw(payload);
        return End(start);
    }

    public ServerWriter Ack(NbdOption option) => Reply(option, NbdReplyType.Ack, []);

    public ServerWriter Error(NbdOption option, NbdReplyType type, string? message) =>
        Reply(option, type, message is null ? [] : Encoding.UTF8.GetBytes(message));

    /// <summary>NBD_REP_INFO / NBD_INFO_EXPORT: type 0, 64-bit size, 16-bit transmission flags.</summary>
    public ServerWriter InfoExport(NbdOption option, ulong size, ushort flags)
    {
        Span<byte> p = stackalloc byte[12];
        BinaryPrimitives.WriteUInt16BigEndian(p, 0);
        BinaryPrimitives.WriteUInt64BigEndian(p[2..], size);
        BinaryPrimitives.WriteUInt16BigEndian(p[10..], flags);
        int sizeAt = Length + 20 + 2;
        Reply(option, NbdReplyType.Info, p);
        SizeFields.Add(sizeAt);
        return this;
    }

    /// <summary>NBD_REP_INFO / NBD_INFO_BLOCK_SIZE: type 3, minimum, preferred, maximum.</summary>
    public ServerWriter InfoBlockSize(NbdOption option, uint minimum, uint preferred, uint maximum)
    {
        Span<byte> p = stackalloc byte[14];
        BinaryPrimitives.WriteUInt16BigEndian(p, 3);
        BinaryPrimitives.WriteUInt32BigEndian(p[2..], minimum);
        BinaryPrimitives.WriteUInt32BigEndian(p[6..], preferred);
        BinaryPrimitives.WriteUInt32BigEndian(p[10..], maximum);
        return Reply(option, NbdReplyType.Info, p);
    }

    /// <summary>NBD_REP_INFO carrying a string (type 1 NAME, 2 DESCRIPTION) or an unknown type with any body.</summary>
    public ServerWriter InfoRaw(NbdOption option, ushort infoType, ReadOnlySpan<byte> body)
    {
        var p = new byte[2 + body.Length];
        BinaryPrimitives.WriteUInt16BigEndian(p, infoType);
        body.CopyTo(p.AsSpan(2));
        return Reply(option, NbdReplyType.Info, p);
    }

    /// <summary>NBD_REP_SERVER: 32-bit name length, name, optional description.</summary>
    public ServerWriter Server(string name, string? description)
    {
        byte[] n = Encoding.UTF8.GetBytes(name);
        byte[] d = description is null ? [] : Encoding.UTF8.GetBytes(description);
        var p = new byte[4 + n.Length + d.Length];
        BinaryPrimitives.WriteUInt32BigEndian(p, (uint)n.Length);
        n.CopyTo(p.AsSpan(4));
        d.CopyTo(p.AsSpan(4 + n.Length));
        int nameLengthAt = Length + 20;
        Reply(NbdOption.List, NbdReplyType.Server, p);
        LengthFields.Add(nameLengthAt);
        return this;
    }

    /// <summary>NBD_OPT_EXPORT_NAME reply: 64-bit size, 16-bit flags, 124 zeroes unless NO_ZEROES was negotiated.</summary>
    public ServerWriter ExportNameReply(ulong size, ushort flags, bool zeroes)
    {
        int start = Length;
        Size(size).U16(flags);
        if (zeroes)
        {
            Zeroes(124);
        }

        return End(start);
    }

    // ---- Transmission (the relay mode): simple replies, proto.md "Simple reply message" ---------------------------

    /// <summary>
    /// A simple reply: u32 magic 0x67446698, u32 error, u64 cookie, then <paramref name="data"/> (a successful read's).
    /// The error field and both cookie halves are recorded as 32-bit fields and the cookie as a 64-bit one, so the
    /// mutator's "length" and "size" mutations become error and cookie mutations here.
    /// </summary>
    public ServerWriter SimpleReply(uint error, ulong cookie, ReadOnlySpan<byte> data)
    {
        int start = Length;
        MagicFields.Add(Length);
        U32(0x67446698);
        LengthFields.Add(Length);
        U32(error);
        LengthFields.Add(Length);
        LengthFields.Add(Length + 4);
        SizeFields.Add(Length);
        U64(cookie).Raw(data);
        return End(start);
    }

    /// <summary>Bytes outside any message (noise after a valid greeting).</summary>
    public ServerWriter Garbage(ReadOnlySpan<byte> bytes)
    {
        int start = Length;
        Raw(bytes);
        return End(start);
    }

    // ---- Fields -----------------------------------------------------------------------------------------------

    private ServerWriter End(int start)
    {
        Messages.Add((start, Length));
        return this;
    }

    private ServerWriter Magic(ulong v)
    {
        MagicFields.Add(Length);
        return U64(v);
    }

    private ServerWriter Size(ulong v)
    {
        SizeFields.Add(Length);
        return U64(v);
    }

    private ServerWriter U64(ulong v)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, v);
        return Raw(b);
    }

    private ServerWriter U32(uint v)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, v);
        return Raw(b);
    }

    private ServerWriter U16(ushort v)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16BigEndian(b, v);
        return Raw(b);
    }

    private ServerWriter Zeroes(int n)
    {
        for (int i = 0; i < n; i++)
        {
            _bytes.Add(0);
        }

        return this;
    }

    private ServerWriter Raw(ReadOnlySpan<byte> bytes)
    {
        _bytes.AddRange(bytes);
        return this;
    }
}

using System.Buffers.Binary;
using System.Text;

namespace Nbd.Protocol.Tests.TestSupport;

/// <summary>Builds the bytes a server sends, message by message, following proto.md.</summary>
internal sealed class ServerScript
{
    public const ulong NbdMagic = 0x4e42444d41474943;
    public const ulong IHaveOpt = 0x49484156454F5054;
    public const ulong OldMagic = 0x00420281861253;
    public const ulong ReplyMagic = 0x3e889045565a9;

    private readonly List<byte> _bytes = [];

    /// <summary>Offsets where each message starts, for truncation tests.</summary>
    public List<int> Boundaries { get; } = [];

    public int Length => _bytes.Count;

    public byte[] ToArray() => [.. _bytes];

    public ServerScript U64(ulong v) { Span<byte> b = stackalloc byte[8]; BinaryPrimitives.WriteUInt64BigEndian(b, v); _bytes.AddRange(b.ToArray()); return this; }
    public ServerScript U32(uint v) { Span<byte> b = stackalloc byte[4]; BinaryPrimitives.WriteUInt32BigEndian(b, v); _bytes.AddRange(b.ToArray()); return this; }
    public ServerScript U16(ushort v) { Span<byte> b = stackalloc byte[2]; BinaryPrimitives.WriteUInt16BigEndian(b, v); _bytes.AddRange(b.ToArray()); return this; }
    public ServerScript Raw(params byte[] bytes) { _bytes.AddRange(bytes); return this; }
    public ServerScript Zeroes(int n) { _bytes.AddRange(new byte[n]); return this; }

    private ServerScript Mark() { Boundaries.Add(_bytes.Count); return this; }

    public static ServerScript Newstyle(ushort handshakeFlags = 3) => new ServerScript().Mark().U64(NbdMagic).U64(IHaveOpt).U16(handshakeFlags);

    public static ServerScript Oldstyle(ulong size, uint flags) => new ServerScript().Mark().U64(NbdMagic).U64(OldMagic).U64(size).U32(flags).Zeroes(124);

    public ServerScript Reply(NbdOption option, NbdReplyType type, byte[]? payload = null)
    {
        Mark().U64(ReplyMagic).U32((uint)option).U32((uint)type).U32((uint)(payload?.Length ?? 0));
        return payload is null ? this : Raw(payload);
    }

    public ServerScript Ack(NbdOption option) => Reply(option, NbdReplyType.Ack);

    public ServerScript Error(NbdOption option, NbdReplyType type, string? message = null) =>
        Reply(option, type, message is null ? null : Encoding.UTF8.GetBytes(message));

    public ServerScript InfoExport(NbdOption option, ulong size, TransmissionFlags flags) =>
        Reply(option, NbdReplyType.Info, new ServerScript().U16(0).U64(size).U16((ushort)flags).ToArray());

    public ServerScript InfoBlockSize(NbdOption option, uint min, uint preferred, uint max) =>
        Reply(option, NbdReplyType.Info, new ServerScript().U16(3).U32(min).U32(preferred).U32(max).ToArray());

    public ServerScript InfoString(NbdOption option, ushort infoType, string text) =>
        Reply(option, NbdReplyType.Info, new ServerScript().U16(infoType).Raw(Encoding.UTF8.GetBytes(text)).ToArray());

    public ServerScript Server(string name, string? description = null)
    {
        byte[] n = Encoding.UTF8.GetBytes(name);
        var payload = new ServerScript().U32((uint)n.Length).Raw(n);
        if (description is not null)
        {
            payload.Raw(Encoding.UTF8.GetBytes(description));
        }

        return Reply(NbdOption.List, NbdReplyType.Server, payload.ToArray());
    }

    public ServerScript ExportNameReply(ulong size, TransmissionFlags flags, bool zeroes) =>
        zeroes ? Mark().U64(size).U16((ushort)flags).Zeroes(124) : Mark().U64(size).U16((ushort)flags);
}

/// <summary>Builds the bytes the client is expected to send.</summary>
internal static class ClientBytes
{
    public static byte[] Flags(uint flags) => new ServerScript().U32(flags).ToArray();

    public static byte[] Option(NbdOption option, byte[]? data = null) =>
        new ServerScript().U64(ServerScript.IHaveOpt).U32((uint)option).U32((uint)(data?.Length ?? 0)).Raw(data ?? []).ToArray();

    public static byte[] InfoRequest(NbdOption option, string name, params ushort[] infos)
    {
        byte[] n = Encoding.UTF8.GetBytes(name);
        var data = new ServerScript().U32((uint)n.Length).Raw(n).U16((ushort)infos.Length);
        foreach (ushort i in infos)
        {
            data.U16(i);
        }

        return Option(option, data.ToArray());
    }

    public static byte[] Go(string name) => InfoRequest(NbdOption.Go, name, 0, 3);

    public static byte[] Info(string name) => InfoRequest(NbdOption.Info, name, 0, 3, 1, 2);

    public static byte[] Concat(params byte[][] parts) => [.. parts.SelectMany(p => p)];
}

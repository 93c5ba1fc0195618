using System.Text;
using static Nbd.Kernel.Interop.NetlinkConstants;

namespace Nbd.Kernel.Netlink;

/// <summary>One struct nlattr: type without the NLA_F_* bits, and the unpadded payload.</summary>
internal readonly record struct NetlinkAttribute(ushort Type, ReadOnlyMemory<byte> Value)
{
    /// <summary>Parses consecutive attributes; each nla_len is bounded by the bytes that remain.</summary>
    public static List<NetlinkAttribute> ParseAll(ReadOnlyMemory<byte> data)
    {
        var attributes = new List<NetlinkAttribute>();
        int offset = 0;
        while (data.Length - offset >= NLA_HDRLEN)
        {
            var span = data.Span.Slice(offset);
            ushort length = NativeEndian.ReadUInt16(span);
            ushort type = NativeEndian.ReadUInt16(span.Slice(2));
            if (length < NLA_HDRLEN || length > span.Length)
            {
                throw new NetlinkProtocolException($"netlink attribute type {type & NLA_TYPE_MASK} has length {length} with {span.Length} bytes left");
            }
            attributes.Add(new NetlinkAttribute((ushort)(type & NLA_TYPE_MASK), data.Slice(offset + NLA_HDRLEN, length - NLA_HDRLEN)));
            offset += NetlinkMessageBuilder.Align(length);
        }
        return attributes;
    }

    public byte AsUInt8() => Value.Length >= 1 ? Value.Span[0] : throw TooShort(1);

    public ushort AsUInt16() => Value.Length >= 2 ? NativeEndian.ReadUInt16(Value.Span) : throw TooShort(2);

    public uint AsUInt32() => Value.Length >= 4 ? NativeEndian.ReadUInt32(Value.Span) : throw TooShort(4);

    public ulong AsUInt64() => Value.Length >= 8 ? NativeEndian.ReadUInt64(Value.Span) : throw TooShort(8);

    /// <summary>A NUL-terminated (or unterminated) string attribute.</summary>
    public string AsString()
    {
        var span = Value.Span;
        int nul = span.IndexOf((byte)0);
        return Encoding.UTF8.GetString(nul < 0 ? span : span.Slice(0, nul));
    }

    public List<NetlinkAttribute> AsNested() => ParseAll(Value);

    private NetlinkProtocolException TooShort(int needed) =>
        new($"netlink attribute type {Type} has {Value.Length} payload bytes, expected {needed}");
}

internal static class NetlinkAttributeListExtensions
{
    public static NetlinkAttribute? Find(this List<NetlinkAttribute> attributes, ushort type)
    {
        foreach (var attribute in attributes)
        {
            if (attribute.Type == type)
            {
                return attribute;
            }
        }
        return null;
    }
}

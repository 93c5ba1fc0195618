using System.Text;
using static Nbd.Kernel.Interop.NetlinkConstants;

namespace Nbd.Kernel.Netlink;

/// <summary>
/// Builds one netlink message (netlink(7), linux/netlink.h):
/// <code>
///  0               4       6       8               12              16
/// +---------------+-------+-------+---------------+---------------+
/// | nlmsg_len     | type  | flags | nlmsg_seq     | nlmsg_pid     |  struct nlmsghdr
/// +-------+-------+-------+-------+---------------+---------------+
/// | cmd   | ver   | reserved      |                                  struct genlmsghdr (generic netlink)
/// +-------+-------+---------------+
/// | nla_len       | nla_type      | payload ... padded to 4 bytes    struct nlattr, repeated; nested ones contain nlattrs
/// </code>
/// nla_len counts header + payload without the padding; a nested attribute's length covers its (padded) children.
/// </summary>
internal sealed class NetlinkMessageBuilder
{
    private byte[] _buffer = new byte[256];
    private int _length;
    private readonly Stack<int> _nestStarts = new();

    public NetlinkMessageBuilder(ushort type, ushort flags, uint sequence)
    {
        var header = Reserve(NLMSG_HDRLEN);
        // nlmsg_len is patched in ToArray; nlmsg_pid 0 lets the kernel fill in our port id.
        NativeEndian.WriteUInt16(header.Slice(4), type);
        NativeEndian.WriteUInt16(header.Slice(6), flags);
        NativeEndian.WriteUInt32(header.Slice(8), sequence);
    }

    /// <summary>Appends struct genlmsghdr.</summary>
    public NetlinkMessageBuilder GenericHeader(byte command, byte version)
    {
        var header = Reserve(GENL_HDRLEN);
        header[0] = command;
        header[1] = version;
        return this;
    }

    public NetlinkMessageBuilder AddUInt8(ushort type, byte value)
    {
        Attribute(type, 1)[0] = value;
        return this;
    }

    public NetlinkMessageBuilder AddUInt16(ushort type, ushort value)
    {
        NativeEndian.WriteUInt16(Attribute(type, 2), value);
        return this;
    }

    public NetlinkMessageBuilder AddUInt32(ushort type, uint value)
    {
        NativeEndian.WriteUInt32(Attribute(type, 4), value);
        return this;
    }

    public NetlinkMessageBuilder AddUInt64(ushort type, ulong value)
    {
        NativeEndian.WriteUInt64(Attribute(type, 8), value);
        return this;
    }

    /// <summary>NLA_STRING / NLA_NUL_STRING: UTF-8 with a terminating NUL, as nla_put_string writes it.</summary>
    public NetlinkMessageBuilder AddString(ushort type, string value)
    {
        int count = Encoding.UTF8.GetByteCount(value);
        var payload = Attribute(type, count + 1);
        Encoding.UTF8.GetBytes(value, payload);
        payload[count] = 0;
        return this;
    }

    /// <summary>
    /// Opens a nested attribute. NLA_F_NESTED is not set, matching nla_nest_start_noflag and libnl: the nbd family
    /// parses with nla_parse_nested_deprecated and accepts either form.
    /// </summary>
    public NetlinkMessageBuilder BeginNested(ushort type)
    {
        _nestStarts.Push(_length);
        var header = Reserve(NLA_HDRLEN);
        NativeEndian.WriteUInt16(header.Slice(2), type);
        return this;
    }

    public NetlinkMessageBuilder EndNested()
    {
        int start = _nestStarts.Pop();
        NativeEndian.WriteUInt16(_buffer.AsSpan(start), checked((ushort)(_length - start)));
        return this;
    }

    public byte[] ToArray()
    {
        if (_nestStarts.Count != 0)
        {
            throw new InvalidOperationException("Unclosed nested attribute.");
        }
        NativeEndian.WriteUInt32(_buffer, (uint)_length);
        return _buffer.AsSpan(0, _length).ToArray();
    }

    private Span<byte> Attribute(ushort type, int payloadLength)
    {
        int total = NLA_HDRLEN + payloadLength;
        var span = Reserve(Align(total));
        NativeEndian.WriteUInt16(span, checked((ushort)total));
        NativeEndian.WriteUInt16(span.Slice(2), type);
        return span.Slice(NLA_HDRLEN, payloadLength);
    }

    private Span<byte> Reserve(int count)
    {
        if (_length + count > _buffer.Length)
        {
            Array.Resize(ref _buffer, Math.Max(_buffer.Length * 2, _length + count));
        }
        var span = _buffer.AsSpan(_length, count);
        span.Clear();
        _length += count;
        return span;
    }

    internal static int Align(int length) => (length + NLA_ALIGNTO - 1) & ~(NLA_ALIGNTO - 1);
}

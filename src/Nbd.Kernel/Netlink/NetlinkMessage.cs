using static Nbd.Kernel.Interop.NetlinkConstants;

namespace Nbd.Kernel.Netlink;

/// <summary>One parsed nlmsghdr and its payload (everything after the 16-byte header, within nlmsg_len).</summary>
internal readonly record struct NetlinkMessage(ushort Type, ushort Flags, uint Sequence, uint PortId, ReadOnlyMemory<byte> Payload)
{
    /// <summary>
    /// Splits one received datagram into messages. Each nlmsg_len is checked against the bytes actually received
    /// before it is used, so a truncated datagram is an error, never an over-read.
    /// </summary>
    public static List<NetlinkMessage> ParseAll(ReadOnlyMemory<byte> datagram)
    {
        var messages = new List<NetlinkMessage>();
        int offset = 0;
        while (datagram.Length - offset >= NLMSG_HDRLEN)
        {
            var span = datagram.Span.Slice(offset);
            uint length = NativeEndian.ReadUInt32(span);
            if (length < NLMSG_HDRLEN || length > (uint)span.Length)
            {
                throw new NetlinkProtocolException($"netlink message length {length} invalid with {span.Length} bytes left (truncated datagram?)");
            }
            messages.Add(new NetlinkMessage(
                NativeEndian.ReadUInt16(span.Slice(4)),
                NativeEndian.ReadUInt16(span.Slice(6)),
                NativeEndian.ReadUInt32(span.Slice(8)),
                NativeEndian.ReadUInt32(span.Slice(12)),
                datagram.Slice(offset + NLMSG_HDRLEN, (int)length - NLMSG_HDRLEN)));
            offset += NetlinkMessageBuilder.Align((int)length);
        }
        if (offset < datagram.Length)
        {
            throw new NetlinkProtocolException($"{datagram.Length - offset} trailing bytes after the last netlink message");
        }
        return messages;
    }

    /// <summary>For generic netlink messages: the genlmsghdr command.</summary>
    public byte GenericCommand => Payload.Length >= GENL_HDRLEN ? Payload.Span[0]
        : throw new NetlinkProtocolException("generic netlink message shorter than genlmsghdr");

    /// <summary>For generic netlink messages: the attributes after genlmsghdr (family hdrsize is 0 for ctrl and nbd).</summary>
    public List<NetlinkAttribute> GenericAttributes() =>
        Payload.Length >= GENL_HDRLEN ? NetlinkAttribute.ParseAll(Payload.Slice(GENL_HDRLEN))
        : throw new NetlinkProtocolException("generic netlink message shorter than genlmsghdr");
}

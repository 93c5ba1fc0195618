using static Nbd.Kernel.Interop.NetlinkConstants;

namespace Nbd.Kernel.Netlink;

/// <summary>
/// The payload of NLMSG_ERROR (struct nlmsgerr): an int error (0 = ACK, else -errno), the header of the request it
/// answers, that request's payload unless NLM_F_CAPPED, then extended-ack TLVs when NLM_F_ACK_TLVS is set.
/// </summary>
internal readonly record struct NetlinkAck(int Errno, uint RequestSequence, string? ExtendedMessage)
{
    public static NetlinkAck Parse(NetlinkMessage message)
    {
        if (message.Type != NLMSG_ERROR)
        {
            throw new NetlinkProtocolException($"expected NLMSG_ERROR, got message type {message.Type}");
        }
        var payload = message.Payload;
        if (payload.Length < 4 + NLMSG_HDRLEN)
        {
            throw new NetlinkProtocolException($"NLMSG_ERROR payload of {payload.Length} bytes is shorter than struct nlmsgerr");
        }
        int error = NativeEndian.ReadInt32(payload.Span);
        var original = payload.Span.Slice(4, NLMSG_HDRLEN);
        uint originalLength = NativeEndian.ReadUInt32(original);
        uint sequence = NativeEndian.ReadUInt32(original.Slice(8));

        string? text = null;
        if ((message.Flags & NLM_F_ACK_TLVS) != 0)
        {
            int tlvStart = 4 + ((message.Flags & NLM_F_CAPPED) != 0
                ? NLMSG_HDRLEN
                : NetlinkMessageBuilder.Align((int)Math.Min(originalLength, (uint)payload.Length)));
            if (tlvStart <= payload.Length)
            {
                text = NetlinkAttribute.ParseAll(payload.Slice(tlvStart)).Find(NLMSGERR_ATTR_MSG)?.AsString();
            }
        }
        return new NetlinkAck(-error, sequence, string.IsNullOrEmpty(text) ? null : text);
    }
}

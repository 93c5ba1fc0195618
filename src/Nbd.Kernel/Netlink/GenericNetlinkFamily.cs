using Nbd.Kernel.Interop;
using static Nbd.Kernel.Interop.NetlinkConstants;

namespace Nbd.Kernel.Netlink;

/// <summary>A generic netlink family as CTRL_CMD_GETFAMILY reports it: its dynamic id and multicast groups.</summary>
internal sealed record GenericNetlinkFamily(ushort Id, string Name, uint Version, IReadOnlyDictionary<string, uint> MulticastGroups)
{
    /// <summary>CTRL_CMD_GETFAMILY request for <paramref name="name"/> (to the fixed controller id GENL_ID_CTRL).</summary>
    public static byte[] BuildRequest(string name, uint sequence) =>
        new NetlinkMessageBuilder(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, sequence)
            .GenericHeader(CTRL_CMD_GETFAMILY, 1)
            .AddString(CTRL_ATTR_FAMILY_NAME, name)
            .ToArray();

    /// <summary>
    /// Parses the controller's reply: CTRL_ATTR_FAMILY_ID (u16), CTRL_ATTR_FAMILY_NAME, CTRL_ATTR_VERSION (u32) and
    /// CTRL_ATTR_MCAST_GROUPS = nest of entries (attribute type = position) each holding GRP_NAME and GRP_ID (u32).
    /// </summary>
    public static GenericNetlinkFamily ParseReply(NetlinkMessage message)
    {
        if (message.Type != GENL_ID_CTRL)
        {
            throw new NetlinkProtocolException($"expected a controller reply (type {GENL_ID_CTRL}), got type {message.Type}");
        }
        var attributes = message.GenericAttributes();
        ushort id = attributes.Find(CTRL_ATTR_FAMILY_ID)?.AsUInt16()
            ?? throw new NetlinkProtocolException("GETFAMILY reply without CTRL_ATTR_FAMILY_ID");
        string name = attributes.Find(CTRL_ATTR_FAMILY_NAME)?.AsString() ?? string.Empty;
        uint version = attributes.Find(CTRL_ATTR_VERSION)?.AsUInt32() ?? 0;
        var groups = new Dictionary<string, uint>(StringComparer.Ordinal);
        if (attributes.Find(CTRL_ATTR_MCAST_GROUPS) is { } groupList)
        {
            foreach (var entry in groupList.AsNested())
            {
                var fields = entry.AsNested();
                if (fields.Find(CTRL_ATTR_MCAST_GRP_NAME) is { } groupName && fields.Find(CTRL_ATTR_MCAST_GRP_ID) is { } groupId)
                {
                    groups[groupName.AsString()] = groupId.AsUInt32();
                }
            }
        }
        return new GenericNetlinkFamily(id, name, version, groups);
    }

    /// <summary>Resolves a family through <paramref name="client"/>; ENOENT means the module providing it is not loaded.</summary>
    public static GenericNetlinkFamily Resolve(GenericNetlinkClient client, string name)
    {
        uint sequence = client.NextSequence();
        var replies = client.Request(BuildRequest(name, sequence), sequence, "netlink " + name, "CTRL_CMD_GETFAMILY",
            errno => errno == Errno.ENOENT ? $"generic netlink family '{name}' is not registered; is the nbd module loaded (modprobe nbd)?" : null);
        foreach (var reply in replies)
        {
            if (reply.Type == GENL_ID_CTRL)
            {
                return ParseReply(reply);
            }
        }
        throw new NbdKernelException("netlink " + name, "CTRL_CMD_GETFAMILY", Errno.EBADMSG, "the controller acknowledged without a reply");
    }
}

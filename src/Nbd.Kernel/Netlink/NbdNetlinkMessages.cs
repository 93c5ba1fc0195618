using static Nbd.Kernel.Interop.NetlinkConstants;

namespace Nbd.Kernel.Netlink;

/// <summary>
/// The nbd generic netlink family's messages (linux/nbd-netlink.h; attribute types from nbd_attr_policy in
/// drivers/block/nbd.c: INDEX u32, sizes/timeouts/flags u64, SOCKETS nested, BACKEND_IDENTIFIER string).
/// Pure functions: descriptor numbers and the family id come in as plain values.
/// </summary>
internal static class NbdNetlinkMessages
{
    private const ushort RequestFlags = NLM_F_REQUEST | NLM_F_ACK;

    /// <summary>
    /// NBD_CMD_CONNECT. Sockets are nested as the header documents:
    /// [NBD_ATTR_SOCKETS [NBD_SOCK_ITEM [NBD_SOCK_FD u32]] [NBD_SOCK_ITEM [NBD_SOCK_FD u32]] ...].
    /// </summary>
    public static byte[] BuildConnect(ushort familyId, uint sequence, NbdNetlinkConnectRequest request, IReadOnlyList<uint> descriptors, ulong? timeoutSeconds, ulong? deadConnectionSeconds)
    {
        var builder = Start(familyId, sequence, NBD_CMD_CONNECT);
        if (request.Index is int index)
        {
            builder.AddUInt32(NBD_ATTR_INDEX, checked((uint)index));
        }
        builder.AddUInt64(NBD_ATTR_SIZE_BYTES, request.SizeBytes);
        if (request.BlockSize != 0)
        {
            builder.AddUInt64(NBD_ATTR_BLOCK_SIZE_BYTES, request.BlockSize);
        }
        if (timeoutSeconds is ulong timeout)
        {
            builder.AddUInt64(NBD_ATTR_TIMEOUT, timeout);
        }
        if (deadConnectionSeconds is ulong dead)
        {
            builder.AddUInt64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead);
        }
        builder.AddUInt64(NBD_ATTR_SERVER_FLAGS, request.ServerFlags);
        builder.AddUInt64(NBD_ATTR_CLIENT_FLAGS, request.ClientFlags);
        AddSockets(builder, descriptors);
        if (request.BackendIdentifier is { } backend)
        {
            builder.AddString(NBD_ATTR_BACKEND_IDENTIFIER, backend);
        }
        return builder.ToArray();
    }

    public static byte[] BuildDisconnect(ushort familyId, uint sequence, int index) =>
        Start(familyId, sequence, NBD_CMD_DISCONNECT).AddUInt32(NBD_ATTR_INDEX, checked((uint)index)).ToArray();

    public static byte[] BuildReconfigure(ushort familyId, uint sequence, NbdNetlinkReconfigureRequest request, IReadOnlyList<uint> descriptors, ulong? timeoutSeconds, ulong? deadConnectionSeconds)
    {
        var builder = Start(familyId, sequence, NBD_CMD_RECONFIGURE).AddUInt32(NBD_ATTR_INDEX, checked((uint)request.Index));
        if (timeoutSeconds is ulong timeout)
        {
            builder.AddUInt64(NBD_ATTR_TIMEOUT, timeout);
        }
        if (deadConnectionSeconds is ulong dead)
        {
            builder.AddUInt64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead);
        }
        if (request.ClientFlags is ulong flags)
        {
            builder.AddUInt64(NBD_ATTR_CLIENT_FLAGS, flags);
        }
        if (descriptors.Count > 0)
        {
            AddSockets(builder, descriptors);
        }
        if (request.BackendIdentifier is { } backend)
        {
            builder.AddString(NBD_ATTR_BACKEND_IDENTIFIER, backend);
        }
        return builder.ToArray();
    }

    /// <summary>NBD_CMD_STATUS; without an index the kernel lists every device.</summary>
    public static byte[] BuildStatus(ushort familyId, uint sequence, int? index)
    {
        var builder = Start(familyId, sequence, NBD_CMD_STATUS);
        if (index is int i)
        {
            builder.AddUInt32(NBD_ATTR_INDEX, checked((uint)i));
        }
        return builder.ToArray();
    }

    /// <summary>The CONNECT reply (nbd_connect_reply): NBD_ATTR_INDEX u32 of the device that was configured.</summary>
    public static int? ParseConnectReply(NetlinkMessage message) =>
        message.GenericCommand == NBD_CMD_CONNECT && message.GenericAttributes().Find(NBD_ATTR_INDEX) is { } index
            ? checked((int)index.AsUInt32())
            : null;

    /// <summary>
    /// The STATUS reply: [NBD_ATTR_DEVICE_LIST [NBD_DEVICE_ITEM [NBD_DEVICE_INDEX u32][NBD_DEVICE_CONNECTED u8]] ...].
    /// </summary>
    public static List<NbdNetlinkDeviceStatus> ParseStatusReply(NetlinkMessage message)
    {
        var result = new List<NbdNetlinkDeviceStatus>();
        if (message.GenericCommand != NBD_CMD_STATUS)
        {
            throw new NetlinkProtocolException($"expected an NBD_CMD_STATUS reply, got command {message.GenericCommand}");
        }
        if (message.GenericAttributes().Find(NBD_ATTR_DEVICE_LIST) is not { } list)
        {
            return result;
        }
        foreach (var item in list.AsNested())
        {
            if (item.Type != NBD_DEVICE_ITEM)
            {
                continue;
            }
            var fields = item.AsNested();
            var index = fields.Find(NBD_DEVICE_INDEX) ?? throw new NetlinkProtocolException("NBD_DEVICE_ITEM without NBD_DEVICE_INDEX");
            bool connected = fields.Find(NBD_DEVICE_CONNECTED) is { } c && c.AsUInt8() != 0;
            result.Add(new NbdNetlinkDeviceStatus(checked((int)index.AsUInt32()), connected));
        }
        return result;
    }

    /// <summary>The multicast NBD_CMD_LINK_DEAD (nbd_mcast_index): NBD_ATTR_INDEX of the device whose socket died.</summary>
    public static int? ParseLinkDead(NetlinkMessage message, ushort familyId) =>
        message.Type == familyId && message.GenericCommand == NBD_CMD_LINK_DEAD &&
        message.GenericAttributes().Find(NBD_ATTR_INDEX) is { } index
            ? checked((int)index.AsUInt32())
            : null;

    private static NetlinkMessageBuilder Start(ushort familyId, uint sequence, byte command) =>
        new NetlinkMessageBuilder(familyId, RequestFlags, sequence).GenericHeader(command, NBD_GENL_VERSION);

    private static void AddSockets(NetlinkMessageBuilder builder, IReadOnlyList<uint> descriptors)
    {
        builder.BeginNested(NBD_ATTR_SOCKETS);
        foreach (uint fd in descriptors)
        {
            builder.BeginNested(NBD_SOCK_ITEM).AddUInt32(NBD_SOCK_FD, fd).EndNested();
        }
        builder.EndNested();
    }
}

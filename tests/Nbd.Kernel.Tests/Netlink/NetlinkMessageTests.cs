using Nbd.Kernel.Interop;
using Nbd.Kernel.Netlink;

namespace Nbd.Kernel.Tests.Netlink;

/// <summary>Byte-exact netlink building and parsing (host byte order; these vectors are little-endian).</summary>
public sealed class NetlinkMessageTests
{
    public NetlinkMessageTests() => Assert.True(BitConverter.IsLittleEndian, "vectors below are little-endian");

    private static byte[] Hex(string text) => Convert.FromHexString(text.Replace(" ", "", StringComparison.Ordinal).Replace("|", "", StringComparison.Ordinal));

    [Fact]
    public void GetFamilyRequest_Nbd_IsByteExact()
    {
        var bytes = GenericNetlinkFamily.BuildRequest("nbd", 7);
        Assert.Equal(Hex(
            "1c000000 1000 0500 07000000 00000000 |" + // nlmsghdr: len 28, GENL_ID_CTRL, REQUEST|ACK, seq 7, pid 0
            "03 01 0000 |" +                           // genlmsghdr: CTRL_CMD_GETFAMILY v1
            "0800 0200 6e626400"), bytes);             // CTRL_ATTR_FAMILY_NAME "nbd\0"
    }

    [Fact]
    public void Connect_AllAttributesAndTwoSockets_IsByteExact()
    {
        var request = new NbdNetlinkConnectRequest
        {
            Index = 3, SizeBytes = 0x100000, BlockSize = 4096, ServerFlags = 0x0107, ClientFlags = NbdClientFlags.DestroyOnDisconnect,
            Sockets = [], BackendIdentifier = "b1",
        };
        var bytes = NbdNetlinkMessages.BuildConnect(0x1a, 2, request, [5u, 9u], timeoutSeconds: 30, deadConnectionSeconds: null);
        Assert.Equal(Hex(
            "7c000000 1a00 0500 02000000 00000000 |" +        // len 124, family 0x1a
            "01 01 0000 |" +                                  // NBD_CMD_CONNECT, version 1
            "0800 0100 03000000 |" +                          // NBD_ATTR_INDEX u32 3
            "0c00 0200 0000100000000000 |" +                  // NBD_ATTR_SIZE_BYTES u64 1 MiB
            "0c00 0300 0010000000000000 |" +                  // NBD_ATTR_BLOCK_SIZE_BYTES 4096
            "0c00 0400 1e00000000000000 |" +                  // NBD_ATTR_TIMEOUT 30
            "0c00 0500 0701000000000000 |" +                  // NBD_ATTR_SERVER_FLAGS 0x107
            "0c00 0600 0100000000000000 |" +                  // NBD_ATTR_CLIENT_FLAGS DESTROY_ON_DISCONNECT
            "1c00 0700 |" +                                   // NBD_ATTR_SOCKETS (28 bytes)
            "  0c00 0100 | 0800 0100 05000000 |" +            //   NBD_SOCK_ITEM [NBD_SOCK_FD 5]
            "  0c00 0100 | 0800 0100 09000000 |" +            //   NBD_SOCK_ITEM [NBD_SOCK_FD 9]
            "0700 0a00 623100 00"), bytes);                   // NBD_ATTR_BACKEND_IDENTIFIER "b1\0" + 1 pad byte
    }

    [Fact]
    public void Connect_Minimal_OmitsOptionalAttributes()
    {
        var request = new NbdNetlinkConnectRequest { SizeBytes = 512, Sockets = [] };
        var bytes = NbdNetlinkMessages.BuildConnect(0x1a, 1, request, [3u], null, null);
        Assert.Equal(Hex(
            "48000000 1a00 0500 01000000 00000000 | 01 01 0000 |" +
            "0c00 0200 0002000000000000 | 0c00 0500 0000000000000000 | 0c00 0600 0000000000000000 |" +
            "1000 0700 0c00 0100 0800 0100 03000000"), bytes);
    }

    [Fact]
    public void Reconfigure_SocketAndDeadTimeout_IsByteExact()
    {
        var request = new NbdNetlinkReconfigureRequest { Index = 2 };
        var bytes = NbdNetlinkMessages.BuildReconfigure(0x1a, 4, request, [11u], timeoutSeconds: null, deadConnectionSeconds: 60);
        Assert.Equal(Hex(
            "38000000 1a00 0500 04000000 00000000 | 03 01 0000 |" +
            "0800 0100 02000000 | 0c00 0800 3c00000000000000 |" +
            "1000 0700 0c00 0100 0800 0100 0b000000"), bytes);
    }

    [Fact]
    public void DisconnectAndStatus_AreByteExact()
    {
        Assert.Equal(Hex("1c000000 1a00 0500 05000000 00000000 02 01 0000 0800 0100 07000000"),
            NbdNetlinkMessages.BuildDisconnect(0x1a, 5, 7));
        Assert.Equal(Hex("14000000 1a00 0500 06000000 00000000 05 01 0000"),
            NbdNetlinkMessages.BuildStatus(0x1a, 6, null));
    }

    [Fact]
    public void Builder_StringNeedingNoPadding_AndU8U16_AreAligned()
    {
        var bytes = new NetlinkMessageBuilder(0x20, 1, 1).AddString(1, "abc").AddUInt8(2, 0xff).AddUInt16(3, 0x1234).ToArray();
        Assert.Equal(Hex("28000000 2000 0100 01000000 00000000 | 0800 0100 61626300 | 0500 0200 ff000000 | 0600 0300 34120000"), bytes);
    }

    private const string FamilyReply =
        "50000000 1000 0000 07000000 d2040000 |" +            // controller reply, seq 7, pid 1234
        "01 02 0000 |" +                                      // CTRL_CMD_NEWFAMILY v2
        "0600 0100 1a00 0000 |" +                             // CTRL_ATTR_FAMILY_ID u16 0x1a (+2 pad)
        "0800 0200 6e626400 |" +                              // CTRL_ATTR_FAMILY_NAME "nbd"
        "0800 0300 01000000 |" +                              // CTRL_ATTR_VERSION 1
        "2400 0780 |" +                                       // CTRL_ATTR_MCAST_GROUPS, NLA_F_NESTED set
        "  2000 0100 |" +                                     //   entry #1
        "    0800 0200 0b000000 |" +                          //     CTRL_ATTR_MCAST_GRP_ID 11
        "    1100 0100 6e62645f6d635f67726f757000 000000";   //     CTRL_ATTR_MCAST_GRP_NAME "nbd_mc_group" (+3 pad)

    [Fact]
    public void GetFamilyReply_WithMulticastGroups_Parses()
    {
        var messages = NetlinkMessage.ParseAll(Hex(FamilyReply));
        var message = Assert.Single(messages);
        Assert.Equal(7u, message.Sequence);
        Assert.Equal(1234u, message.PortId);
        var family = GenericNetlinkFamily.ParseReply(message);
        Assert.Equal((ushort)0x1a, family.Id);
        Assert.Equal("nbd", family.Name);
        Assert.Equal(1u, family.Version);
        Assert.Equal(11u, Assert.Single(family.MulticastGroups, g => g.Key == "nbd_mc_group").Value);
    }

    [Fact]
    public void ParseAll_TwoMessagesInOneDatagram_SplitsAtAlignedLength()
    {
        var ack = Hex("24000000 0200 0001 07000000 00000000 | 00000000 | 1c000000 1000 0500 07000000 00000000");
        var datagram = Hex(FamilyReply).Concat(ack).ToArray();
        var messages = NetlinkMessage.ParseAll(datagram);
        Assert.Equal(2, messages.Count);
        Assert.Equal(NetlinkConstants.GENL_ID_CTRL, messages[0].Type);
        Assert.Equal(NetlinkConstants.NLMSG_ERROR, messages[1].Type);
        var parsed = NetlinkAck.Parse(messages[1]);
        Assert.Equal(0, parsed.Errno);
        Assert.Equal(7u, parsed.RequestSequence);
        Assert.Null(parsed.ExtendedMessage);
    }

    [Fact]
    public void Ack_CappedWithExtendedMessage_ParsesErrnoAndText()
    {
        var bytes = Hex(
            "2c000000 0200 0003 09000000 00000000 |" +  // NLMSG_ERROR, flags CAPPED|ACK_TLVS
            "eaffffff |" +                              // -EINVAL
            "1c000000 1a00 0500 09000000 00000000 |" +  // the request's header
            "0800 0100 62616400");                      // NLMSGERR_ATTR_MSG "bad"
        var ack = NetlinkAck.Parse(Assert.Single(NetlinkMessage.ParseAll(bytes)));
        Assert.Equal(Errno.EINVAL, ack.Errno);
        Assert.Equal(9u, ack.RequestSequence);
        Assert.Equal("bad", ack.ExtendedMessage);
    }

    [Fact]
    public void Ack_UncappedWithTlvs_SkipsEchoedPayload()
    {
        var bytes = Hex(
            "34000000 0200 0002 09000000 00000000 | f0ffffff |" +   // ACK_TLVS only, -EBUSY
            "18000000 1a00 0500 09000000 00000000 | 02010000 0000 0000 |" + // echoed request: header + 8 payload bytes
            "0800 0100 78797a00");
        var ack = NetlinkAck.Parse(Assert.Single(NetlinkMessage.ParseAll(bytes)));
        Assert.Equal(Errno.EBUSY, ack.Errno);
        Assert.Equal("xyz", ack.ExtendedMessage);
    }

    [Fact]
    public void StatusReply_TwoDevices_Parses()
    {
        var bytes = Hex(
            "40000000 1a00 0000 06000000 00000000 | 05 01 0000 |" +
            "2c00 0900 |" +                                            // NBD_ATTR_DEVICE_LIST
            "  1400 0100 | 0800 0100 00000000 | 0500 0200 01 000000 |" + //   item: index 0, connected
            "  1400 0100 | 0800 0100 01000000 | 0500 0200 00 000000");   //   item: index 1, not connected
        var devices = NbdNetlinkMessages.ParseStatusReply(Assert.Single(NetlinkMessage.ParseAll(bytes)));
        Assert.Equal([new NbdNetlinkDeviceStatus(0, true), new NbdNetlinkDeviceStatus(1, false)], devices);
    }

    [Fact]
    public void ConnectReplyAndLinkDead_ParseIndex()
    {
        var connect = Assert.Single(NetlinkMessage.ParseAll(Hex("1c000000 1a00 0000 02000000 00000000 01 01 0000 0800 0100 05000000")));
        Assert.Equal(5, NbdNetlinkMessages.ParseConnectReply(connect));
        var dead = Assert.Single(NetlinkMessage.ParseAll(Hex("1c000000 1a00 0000 00000000 00000000 04 01 0000 0800 0100 02000000")));
        Assert.Equal(2, NbdNetlinkMessages.ParseLinkDead(dead, 0x1a));
        Assert.Null(NbdNetlinkMessages.ParseLinkDead(dead, 0x1b));
    }

    [Theory]
    [InlineData("20000000 1a00 0000 02000000 00000000 01010000")]                 // nlmsg_len 32 > 20 bytes received
    [InlineData("0c000000 1a00 0000 02000000 00000000")]                         // nlmsg_len 12 < header
    [InlineData("14000000 1a00 0000 02000000 00000000 01010000 0000")]           // 2 trailing bytes
    public void ParseAll_BadMessageLength_Throws(string hex) =>
        Assert.Throws<NetlinkProtocolException>(() => NetlinkMessage.ParseAll(Hex(hex)));

    [Theory]
    [InlineData("0900 0100 05000000")] // nla_len 9 > 8 bytes left
    [InlineData("0200 0100 05000000")] // nla_len 2 < header
    public void ParseAttributes_BadLength_Throws(string hex) =>
        Assert.Throws<NetlinkProtocolException>(() => NetlinkAttribute.ParseAll(Hex(hex)));

    [Fact]
    public void Attribute_ShorterThanType_Throws()
    {
        var attribute = Assert.Single(NetlinkAttribute.ParseAll(Hex("0600 0100 0100 0000")));
        Assert.Equal((ushort)1, attribute.AsUInt16());
        Assert.Throws<NetlinkProtocolException>(() => attribute.AsUInt32());
    }
}

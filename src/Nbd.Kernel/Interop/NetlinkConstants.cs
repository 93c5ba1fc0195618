namespace Nbd.Kernel.Interop;

/// <summary>
/// Numbers of netlink (linux/netlink.h), generic netlink (linux/genetlink.h) and the nbd family
/// (linux/nbd-netlink.h). Checked against the installed headers by HeaderConstantsTests.
/// </summary>
internal static class NetlinkConstants
{
    // socket(2) / setsockopt(2)
    public const int AF_NETLINK = 16;
    public const int SOCK_RAW = 3;
    public const int SOCK_CLOEXEC = 0x80000;
    public const int NETLINK_GENERIC = 16;
    public const int SOL_NETLINK = 270;
    public const int NETLINK_ADD_MEMBERSHIP = 1;
    public const int NETLINK_CAP_ACK = 10;
    public const int NETLINK_EXT_ACK = 11;

    // struct nlmsghdr
    public const int NLMSG_HDRLEN = 16;
    public const int NLMSG_ALIGNTO = 4;
    public const ushort NLMSG_NOOP = 1;
    public const ushort NLMSG_ERROR = 2;
    public const ushort NLMSG_DONE = 3;
    public const ushort NLM_F_REQUEST = 0x01;
    public const ushort NLM_F_MULTI = 0x02;
    public const ushort NLM_F_ACK = 0x04;
    public const ushort NLM_F_CAPPED = 0x100;
    public const ushort NLM_F_ACK_TLVS = 0x200;
    public const ushort NLMSGERR_ATTR_MSG = 1;

    // struct nlattr
    public const int NLA_HDRLEN = 4;
    public const int NLA_ALIGNTO = 4;
    public const ushort NLA_F_NESTED = 0x8000;
    public const ushort NLA_F_NET_BYTEORDER = 0x4000;
    public const ushort NLA_TYPE_MASK = 0x3fff;

    // struct genlmsghdr and the controller family
    public const int GENL_HDRLEN = 4;
    public const ushort GENL_ID_CTRL = 0x10;
    public const byte CTRL_CMD_GETFAMILY = 3;
    public const ushort CTRL_ATTR_FAMILY_ID = 1;
    public const ushort CTRL_ATTR_FAMILY_NAME = 2;
    public const ushort CTRL_ATTR_VERSION = 3;
    public const ushort CTRL_ATTR_MCAST_GROUPS = 7;
    public const ushort CTRL_ATTR_MCAST_GRP_NAME = 1;
    public const ushort CTRL_ATTR_MCAST_GRP_ID = 2;

    // linux/nbd-netlink.h
    public const string NBD_GENL_FAMILY_NAME = "nbd";
    public const byte NBD_GENL_VERSION = 1;
    public const string NBD_GENL_MCAST_GROUP_NAME = "nbd_mc_group";

    public const ushort NBD_ATTR_INDEX = 1;
    public const ushort NBD_ATTR_SIZE_BYTES = 2;
    public const ushort NBD_ATTR_BLOCK_SIZE_BYTES = 3;
    public const ushort NBD_ATTR_TIMEOUT = 4;
    public const ushort NBD_ATTR_SERVER_FLAGS = 5;
    public const ushort NBD_ATTR_CLIENT_FLAGS = 6;
    public const ushort NBD_ATTR_SOCKETS = 7;
    public const ushort NBD_ATTR_DEAD_CONN_TIMEOUT = 8;
    public const ushort NBD_ATTR_DEVICE_LIST = 9;
    public const ushort NBD_ATTR_BACKEND_IDENTIFIER = 10;

    public const ushort NBD_DEVICE_ITEM = 1;
    public const ushort NBD_DEVICE_INDEX = 1;
    public const ushort NBD_DEVICE_CONNECTED = 2;

    public const ushort NBD_SOCK_ITEM = 1;
    public const ushort NBD_SOCK_FD = 1;

    public const byte NBD_CMD_CONNECT = 1;
    public const byte NBD_CMD_DISCONNECT = 2;
    public const byte NBD_CMD_RECONFIGURE = 3;
    public const byte NBD_CMD_LINK_DEAD = 4;
    public const byte NBD_CMD_STATUS = 5;
}

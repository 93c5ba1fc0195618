namespace Nbd.Kernel.Interop;

/// <summary>
/// Every number of the classic ioctl interface, from include/uapi/linux/nbd.h. Checked against the installed
/// header by tests/Nbd.Kernel.Tests (HeaderConstantsTests), so a typo cannot survive.
/// </summary>
/// <remarks><c>_IO(0xab, nr)</c> has no size or direction bits, so each request is simply <c>0xab00 | nr</c>.</remarks>
internal static class NbdConstants
{
    public const uint NBD_SET_SOCK = 0xab00;
    public const uint NBD_SET_BLKSIZE = 0xab01;
    public const uint NBD_SET_SIZE = 0xab02;
    public const uint NBD_DO_IT = 0xab03;
    public const uint NBD_CLEAR_SOCK = 0xab04;
    public const uint NBD_CLEAR_QUE = 0xab05;
    public const uint NBD_PRINT_DEBUG = 0xab06;
    public const uint NBD_SET_SIZE_BLOCKS = 0xab07;
    public const uint NBD_DISCONNECT = 0xab08;
    public const uint NBD_SET_TIMEOUT = 0xab09;
    public const uint NBD_SET_FLAGS = 0xab0a;

    // Transmission flags (server side, from the handshake) that the kernel interprets.
    public const ushort NBD_FLAG_HAS_FLAGS = 1 << 0;
    public const ushort NBD_FLAG_READ_ONLY = 1 << 1;
    public const ushort NBD_FLAG_SEND_FLUSH = 1 << 2;
    public const ushort NBD_FLAG_SEND_FUA = 1 << 3;
    public const ushort NBD_FLAG_SEND_TRIM = 1 << 5;
    public const ushort NBD_FLAG_CAN_MULTI_CONN = 1 << 8;

    // Client behaviour flags (netlink NBD_ATTR_CLIENT_FLAGS).
    public const ulong NBD_CFLAG_DESTROY_ON_DISCONNECT = 1 << 0;
    public const ulong NBD_CFLAG_DISCONNECT_ON_CLOSE = 1 << 1;

    /// <summary>drivers/block/nbd.c NBD_DEF_BLKSIZE: the block size of a freshly opened, unconfigured device.</summary>
    public const uint DefaultBlockSize = 1024;

    /// <summary>nbd_is_valid_blksize / blk_validate_block_size: power of two, at least 512, at most PAGE_SIZE.</summary>
    public const uint MinBlockSize = 512;

    // open(2) flags for the block device node (O_RDWR) and sysfs attributes (O_WRONLY | O_TRUNC, as a shell's `>` opens them).
    public const int O_WRONLY = 1;
    public const int O_TRUNC = 0x200;
    public const int O_RDWR = 2;
    public const int O_CLOEXEC = 0x80000;
}

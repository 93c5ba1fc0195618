namespace Nbd.Kernel.Interop;

/// <summary>
/// socket(2), socketpair(2), sendmsg(2), fcntl(2) and memfd_create(2) values for the relay's socket pair, passing its end
/// on, and passing journald a record too large for a datagram (sys/socket.h, fcntl.h, sys/mman.h; checked by HeaderConstantsTests).
/// </summary>
internal static class SocketConstants
{
    public const int AF_UNIX = 1;
    public const int SOCK_STREAM = 1;
    public const int SOCK_DGRAM = 2;
    public const int SOL_SOCKET = 1;
    public const int SO_TYPE = 3;
    public const int SO_DOMAIN = 39;

    /// <summary>
    /// The peek offset of a socket; on a unix stream socket every non-peek recv(2) lowers it by the bytes it consumed,
    /// in the same kernel call: a consumption counter that outlives the reader (PeekOffsetCounterTests, and the VM
    /// probe's peek-offset-counters step on the driver's pair).
    /// </summary>
    public const int SO_PEEK_OFF = 42;
    public const int SCM_RIGHTS = 1;
    public const int MSG_NOSIGNAL = 0x4000;
    public const int MSG_DONTWAIT = 0x40;
    public const int MFD_CLOEXEC = 1;
    public const int MFD_ALLOW_SEALING = 2;
    public const int F_ADD_SEALS = 1033;
    public const int F_GET_SEALS = 1034;
    public const int F_SEAL_SEAL = 1;
    public const int F_SEAL_SHRINK = 2;
    public const int F_SEAL_GROW = 4;
    public const int F_SEAL_WRITE = 8;
    public const int F_GETFD = 1;
    public const int F_SETFD = 2;
    public const int FD_CLOEXEC = 1;
}

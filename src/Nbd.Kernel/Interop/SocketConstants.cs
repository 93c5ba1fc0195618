namespace Nbd.Kernel.Interop;

/// <summary>socket(2), socketpair(2), sendmsg(2) and fcntl(2) values for the relay's socket pair and passing its end on (sys/socket.h, fcntl.h; checked by HeaderConstantsTests).</summary>
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
    public const int F_GETFD = 1;
    public const int F_SETFD = 2;
    public const int FD_CLOEXEC = 1;
}

namespace Nbd.Kernel.Interop;

/// <summary>socket(2)/socketpair(2) values for the relay's socket pair (sys/socket.h; checked by HeaderConstantsTests).</summary>
internal static class SocketConstants
{
    public const int AF_UNIX = 1;
    public const int SOCK_STREAM = 1;
}

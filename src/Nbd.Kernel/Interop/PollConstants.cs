namespace Nbd.Kernel.Interop;

/// <summary>poll(2), fcntl(2) and eventfd(2) values (asm-generic/poll.h, fcntl.h, sys/eventfd.h; checked by HeaderConstantsTests).</summary>
internal static class PollConstants
{
    public const short POLLIN = 0x001;
    public const short POLLERR = 0x008;
    public const short POLLHUP = 0x010;
    public const short POLLNVAL = 0x020;
    public const short POLLRDHUP = 0x2000;

    public const int F_DUPFD_CLOEXEC = 1030;
    public const int EFD_CLOEXEC = 0x80000;
}

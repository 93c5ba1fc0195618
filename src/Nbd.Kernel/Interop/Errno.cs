using System.Runtime.InteropServices;

namespace Nbd.Kernel.Interop;

/// <summary>Linux errno values this layer names in messages (asm-generic/errno*.h; checked by HeaderConstantsTests).</summary>
internal static class Errno
{
    public const int EPERM = 1;
    public const int ENOENT = 2;
    public const int EINTR = 4;
    public const int EIO = 5;
    public const int ENXIO = 6;
    public const int EBADF = 9;
    public const int EAGAIN = 11;
    public const int ENOMEM = 12;
    public const int EACCES = 13;
    public const int EFAULT = 14;
    public const int EBUSY = 16;
    public const int EEXIST = 17;
    public const int ENODEV = 19;
    public const int EINVAL = 22;
    public const int ENOTTY = 25;
    public const int ENOSPC = 28;
    public const int EROFS = 30;
    public const int EPIPE = 32;
    public const int ERANGE = 34;
    public const int ENAMETOOLONG = 36;
    public const int ENOSYS = 38;
    public const int EPROTO = 71;
    public const int EBADMSG = 74;
    public const int EOVERFLOW = 75;
    public const int ENOTSOCK = 88;
    public const int EMSGSIZE = 90;
    public const int EPROTONOSUPPORT = 93;
    public const int EOPNOTSUPP = 95;
    public const int EAFNOSUPPORT = 97;
    public const int ECONNRESET = 104;
    public const int ENOBUFS = 105;
    public const int ENOTCONN = 107;
    public const int ETIMEDOUT = 110;
    public const int ECONNREFUSED = 111;

    private static readonly Dictionary<int, string> Names = new()
    {
        [EPERM] = nameof(EPERM), [ENOENT] = nameof(ENOENT), [EINTR] = nameof(EINTR), [EIO] = nameof(EIO),
        [ENXIO] = nameof(ENXIO), [EBADF] = nameof(EBADF), [EAGAIN] = nameof(EAGAIN), [ENOMEM] = nameof(ENOMEM),
        [EACCES] = nameof(EACCES), [EFAULT] = nameof(EFAULT), [EBUSY] = nameof(EBUSY), [EEXIST] = nameof(EEXIST),
        [ENODEV] = nameof(ENODEV), [EINVAL] = nameof(EINVAL), [ENOTTY] = nameof(ENOTTY), [ENOSPC] = nameof(ENOSPC), [EROFS] = nameof(EROFS),
        [EPIPE] = nameof(EPIPE), [ERANGE] = nameof(ERANGE), [ENAMETOOLONG] = nameof(ENAMETOOLONG), [ENOSYS] = nameof(ENOSYS), [EPROTO] = nameof(EPROTO),
        [EBADMSG] = nameof(EBADMSG), [EOVERFLOW] = nameof(EOVERFLOW), [ENOTSOCK] = nameof(ENOTSOCK),
        [EMSGSIZE] = nameof(EMSGSIZE), [EPROTONOSUPPORT] = nameof(EPROTONOSUPPORT), [EOPNOTSUPP] = nameof(EOPNOTSUPP),
        [EAFNOSUPPORT] = nameof(EAFNOSUPPORT), [ECONNRESET] = nameof(ECONNRESET), [ENOBUFS] = nameof(ENOBUFS),
        [ENOTCONN] = nameof(ENOTCONN), [ETIMEDOUT] = nameof(ETIMEDOUT), [ECONNREFUSED] = nameof(ECONNREFUSED),
    };

    /// <summary>The symbolic name ("EBUSY"), or "errno N" for values outside the table.</summary>
    public static string Name(int errno) => Names.TryGetValue(errno, out var name) ? name : $"errno {errno}";

    /// <summary>strerror(3) text, e.g. "Device or resource busy".</summary>
    public static string Describe(int errno) => Marshal.GetPInvokeErrorMessage(errno);

    /// <summary>Every named value, for the header cross-check test.</summary>
    public static IReadOnlyDictionary<int, string> All => Names;
}

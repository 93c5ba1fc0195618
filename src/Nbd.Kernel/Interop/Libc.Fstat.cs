using System.Runtime.InteropServices;

namespace Nbd.Kernel.Interop;

internal static partial class Libc
{
    /// <summary>
    /// Room for struct stat (144 bytes on x86_64, 128 on the generic layout of aarch64); only st_dev and st_ino are read,
    /// at the offsets both layouts share (checked against sys/stat.h by HeaderConstantsTests).
    /// </summary>
    internal const int StatBufferSize = 256;
    internal const int StatDeviceOffset = 0;
    internal const int StatInodeOffset = 8;

    /// <summary>fstat(2); glibc exports the symbol since 2.33 (earlier ones only had __fxstat).</summary>
    [LibraryImport("libc", EntryPoint = "fstat", SetLastError = true)]
    internal static unsafe partial int Fstat(int fd, byte* buffer);
}

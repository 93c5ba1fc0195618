using System.Runtime.InteropServices;

namespace Nbd.Kernel.Interop;

internal static partial class Libc
{
    [LibraryImport("libc", EntryPoint = "getsockopt", SetLastError = true)]
    internal static unsafe partial int GetSockOpt(SafeHandle fd, int level, int name, void* value, uint* valueLength);

    /// <summary>struct timeval on 64-bit Linux (SO_SNDTIMEO == SO_SNDTIMEO_OLD there).</summary>
    [StructLayout(LayoutKind.Sequential)]
    internal struct TimeVal
    {
        public long Seconds;
        public long Microseconds;
    }
}

using System.Runtime.InteropServices;

namespace Nbd.Kernel.Interop;

internal static partial class Libc
{
    /// <summary>Room for sigset_t: 128 bytes in glibc and musl (1024 signals; checked against signal.h by HeaderConstantsTests).</summary>
    internal const int SigSetSize = 128;

    /// <summary>pthread_sigmask(3): the calling thread's signal mask. Returns 0 or an errno value (not -1 and errno).</summary>
    [LibraryImport("libc", EntryPoint = "pthread_sigmask")]
    internal static unsafe partial int PthreadSigMask(int how, byte* set, byte* oldSet);

    /// <summary>sigfillset(3): every signal in the set.</summary>
    [LibraryImport("libc", EntryPoint = "sigfillset")]
    internal static unsafe partial int SigFillSet(byte* set);

    /// <summary>sigdelset(3): one signal out of the set.</summary>
    [LibraryImport("libc", EntryPoint = "sigdelset")]
    internal static unsafe partial int SigDelSet(byte* set, int signal);
}

namespace Nbd.Kernel.Interop;

/// <summary>pthread_sigmask(3) values (signal.h; checked by HeaderConstantsTests).</summary>
internal static class SignalConstants
{
    public const int SIG_BLOCK = 0;
    public const int SIG_SETMASK = 2;

    // Raised by the thread's own faults, never sent by anyone: blocked, one would kill the process outright instead of
    // reaching the runtime's handler (which turns a fault in managed code into an exception).
    public const int SIGILL = 4;
    public const int SIGTRAP = 5;
    public const int SIGBUS = 7;
    public const int SIGFPE = 8;
    public const int SIGSEGV = 11;
}

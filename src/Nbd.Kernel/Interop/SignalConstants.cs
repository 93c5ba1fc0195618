namespace Nbd.Kernel.Interop;

/// <summary>pthread_sigmask(3) values (signal.h; checked by HeaderConstantsTests).</summary>
internal static class SignalConstants
{
    public const int SIG_BLOCK = 0;
    public const int SIG_SETMASK = 2;
}

using System.Runtime.CompilerServices;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel;

/// <summary>
/// Blocks every signal on the calling thread until disposed, then puts its mask back; a signal that arrived meanwhile
/// is delivered then (to this thread, or to another one if it was sent to the process).
/// </summary>
/// <remarks>
/// For NBD_DO_IT: the driver waits in it with <c>wait_event_interruptible</c>, and a signal the process handles that the
/// kernel delivers to that thread ends the wait with the sockets shut down and the queue cleared: every request in
/// flight fails. A signal sent to the process goes to any thread that does not block it, and the .NET runtime handles
/// SIGCONT (which systemd sends right after SIGTERM at every stop), among others. Blocked here, such a signal goes to
/// another thread. SIGKILL and SIGSTOP cannot be blocked; glibc keeps its own internal signals unblocked; and the
/// signals of the thread's own faults (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP) stay deliverable, for the runtime.
/// The thread is in native code for the whole ioctl, so the runtime has no reason to signal it meanwhile.
/// </remarks>
internal readonly struct ThreadSignalMask : IDisposable
{
    private readonly SigSet _previous;

    private ThreadSignalMask(SigSet previous) => _previous = previous;

    /// <exception cref="InvalidOperationException">pthread_sigmask failed (it fails only for invalid arguments).</exception>
    public static unsafe ThreadSignalMask BlockAll()
    {
        SigSet all = default;
        SigSet previous = default;
        _ = Libc.SigFillSet((byte*)&all);
        foreach (int fault in (ReadOnlySpan<int>)[SignalConstants.SIGILL, SignalConstants.SIGTRAP, SignalConstants.SIGBUS, SignalConstants.SIGFPE, SignalConstants.SIGSEGV])
        {
            _ = Libc.SigDelSet((byte*)&all, fault);
        }

        int error = Libc.PthreadSigMask(SignalConstants.SIG_BLOCK, (byte*)&all, (byte*)&previous);
        if (error != 0)
        {
            throw new InvalidOperationException($"pthread_sigmask(SIG_BLOCK) failed: {Errno.Name(error)}");
        }

        return new ThreadSignalMask(previous);
    }

    public unsafe void Dispose()
    {
        SigSet previous = _previous;
        _ = Libc.PthreadSigMask(SignalConstants.SIG_SETMASK, (byte*)&previous, null);
    }

    [InlineArray(Libc.SigSetSize)]
    private struct SigSet
    {
        private byte _first;
    }
}

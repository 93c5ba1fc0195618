namespace Nbd.Kernel;

/// <summary>
/// How NBD_DO_IT ended. <paramref name="StoppedByRequest"/> is true when this process asked for it
/// (<see cref="NbdServiceLoop.Stop"/> or <see cref="NbdDevice.Disconnect"/>); <paramref name="Errno"/> is the ioctl's
/// errno, 0 when it returned success. The kernel returns 0 both after a requested disconnect and when the server
/// closed the connection; ETIMEDOUT after a request timed out; EBUSY/EINVAL when the device could not start
/// (already running, no socket set, several sockets without NBD_FLAG_CAN_MULTI_CONN), and EBUSY after an interruption
/// (<see cref="Interrupted"/>).
/// </summary>
public sealed record NbdServiceLoopResult(bool StoppedByRequest, int Errno, string? ErrnoName)
{
    /// <summary>
    /// NBD_DO_IT was most likely interrupted while the device served: the process was stopped (SIGSTOP, Ctrl-Z), a
    /// tracer attached (a debugger, <c>strace -p</c>, a dump tool) or the process was frozen (system suspend, the cgroup
    /// freezer), none of which a signal mask keeps out. The driver's wait there is interruptible, and on any interruption
    /// it shuts the sockets down and fails the requests in flight; the call is then restarted and finds the device still
    /// marked running: EBUSY, on a device whose sockets this instance had set. (Another root process starting NBD_DO_IT
    /// on the device between our SET_SOCK and ours would look the same.)
    /// </summary>
    public bool Interrupted { get; init; }

    /// <summary>What ended the loop, in words, for a loop not stopped by request (null when nothing more is known).</summary>
    public string? Description => Interrupted
        ? "interrupted: the process was stopped, traced or frozen (SIGSTOP, Ctrl-Z, a debugger, strace -p, system suspend, cgroup freezer), and the driver shut the connection down"
        : null;
}

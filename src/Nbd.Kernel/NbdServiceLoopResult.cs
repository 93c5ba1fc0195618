namespace Nbd.Kernel;

/// <summary>
/// How NBD_DO_IT ended. <paramref name="StoppedByRequest"/> is true when this process asked for it
/// (<see cref="NbdServiceLoop.Stop"/> or <see cref="NbdDevice.Disconnect"/>); <paramref name="Errno"/> is the ioctl's
/// errno, 0 when it returned success. The kernel returns 0 both after a requested disconnect and when the server
/// closed the connection; ETIMEDOUT after a request timed out; EBUSY/EINVAL when the device could not start
/// (already running, no socket set, several sockets without NBD_FLAG_CAN_MULTI_CONN).
/// </summary>
public sealed record NbdServiceLoopResult(bool StoppedByRequest, int Errno, string? ErrnoName);

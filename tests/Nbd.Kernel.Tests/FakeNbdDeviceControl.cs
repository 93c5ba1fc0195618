using System.Net.Sockets;

namespace Nbd.Kernel.Tests;

/// <summary>Records ioctls instead of calling the driver; NBD_DO_IT blocks until NBD_CLEAR_SOCK, like the kernel.</summary>
internal sealed class FakeNbdDeviceControl : INbdDeviceControl
{
    private readonly ManualResetEventSlim _socketsCleared = new();

    public List<(uint Request, ulong Argument)> Calls { get; } = [];

    /// <summary>errno to answer per request (0 when absent).</summary>
    public Dictionary<uint, int> Errors { get; } = [];

    public bool Disposed { get; private set; }

    /// <summary>Behave like a closed SafeHandle does in LibraryImport marshalling.</summary>
    public bool ThrowDisposedAfterDispose { get; set; }

    public string? DoItThreadName { get; private set; }

    /// <summary>When set, NBD_DISCONNECT blocks until it is (the driver's NBD_CMD_DISC send stuck behind a full socket).</summary>
    public ManualResetEventSlim? DisconnectRelease { get; set; }

    public bool DoItOnThreadPool { get; private set; }

    /// <summary>When set, NBD_DO_IT runs this on the calling thread and answers what it returns (instead of waiting for NBD_CLEAR_SOCK).</summary>
    public Func<int>? DoItBody { get; set; }

    public bool HasCall(uint request)
    {
        lock (Calls)
        {
            return Calls.Exists(c => c.Request == request);
        }
    }

    public int Ioctl(uint request, ulong argument)
    {
        ObjectDisposedException.ThrowIf(Disposed && ThrowDisposedAfterDispose, this);
        lock (Calls)
        {
            Calls.Add((request, argument));
        }
        if (request == Nbd.Kernel.Interop.NbdConstants.NBD_CLEAR_SOCK)
        {
            _socketsCleared.Set();
        }
        if (request == Nbd.Kernel.Interop.NbdConstants.NBD_DISCONNECT && DisconnectRelease is { } release)
        {
            release.Wait(TimeSpan.FromSeconds(30));
        }
        if (request == Nbd.Kernel.Interop.NbdConstants.NBD_DO_IT)
        {
            DoItThreadName = Thread.CurrentThread.Name;
            DoItOnThreadPool = Thread.CurrentThread.IsThreadPoolThread;
            if (DoItBody is { } body)
            {
                return body();
            }

            if (!_socketsCleared.Wait(TimeSpan.FromSeconds(10)))
            {
                return Nbd.Kernel.Interop.Errno.ETIMEDOUT;
            }
        }
        return Errors.GetValueOrDefault(request);
    }

    public int IoctlWithSocket(uint request, SafeSocketHandle socket)
    {
        Assert.False(socket.IsInvalid);
        return Ioctl(request, ulong.MaxValue);
    }

    public void Dispose() => Disposed = true;
}

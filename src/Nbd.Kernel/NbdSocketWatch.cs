using System.Net.Sockets;
using System.Runtime.InteropServices;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel;

/// <summary>How a watched connection ended, from poll(2)'s view of the socket.</summary>
public enum NbdSocketEndReason
{
    /// <summary>POLLRDHUP alone: the peer shut its side down (FIN): the server closed or died.</summary>
    PeerClosed,

    /// <summary>POLLHUP: both directions are shut: shut down here (by the driver marking the connection dead, or by
    /// us), or a unix-socket peer closed.</summary>
    Closed,

    /// <summary>POLLERR: a pending socket error (keepalive or retransmission timeout, reset, unreachable).</summary>
    Error,
}

/// <summary>Which watched socket ended first, and how.</summary>
/// <param name="Index">Position of the socket in the list given to <see cref="NbdSocketWatch.Start"/>.</param>
/// <param name="Reason">What poll reported.</param>
public readonly record struct NbdSocketEnd(int Index, NbdSocketEndReason Reason)
{
    /// <summary>The few words for a log line, e.g. "the server closed the connection".</summary>
    public string Describe() => Reason switch
    {
        NbdSocketEndReason.PeerClosed => "the server closed the connection",
        NbdSocketEndReason.Closed => "connection closed or shut down",
        _ => "connection error",
    };
}

/// <summary>
/// Watches sockets handed to the driver for the end of their connection, without touching the connection: each
/// socket is duplicated (F_DUPFD_CLOEXEC) and the duplicates are polled for POLLRDHUP/POLLHUP/POLLERR only, never
/// for input, so the driver's receive loop keeps every byte and the watch costs nothing while the link is healthy.
/// The socket is shared with the driver, so its end is visible here whoever caused it: the server (FIN, RST), the
/// network (keepalive or retransmission timeout), or the driver itself, which shuts a connection down when it
/// marks it dead (request timeout, NBD_CMD_DISCONNECT).
/// Duplicates rather than the caller's handles: .NET disposing a socket that another thread is using unblocks that
/// thread by disconnecting the socket, which would end the very connection the driver is serving on.
/// One dedicated thread per watch blocks in poll(2) (an eventfd wakes it on <see cref="Dispose"/>); the sockets
/// never join .NET's epoll loop.
/// </summary>
public sealed class NbdSocketWatch : IDisposable
{
    private const short EndEvents = PollConstants.POLLRDHUP | PollConstants.POLLHUP | PollConstants.POLLERR | PollConstants.POLLNVAL;

    private readonly int[] _duplicates;
    private readonly int _wake;
    private readonly Lock _lock = new();
    private readonly TaskCompletionSource<NbdSocketEnd> _ended = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly Thread _thread;
    private bool _descriptorsClosed;
    private bool _disposed;

    private NbdSocketWatch(int[] duplicates, int wake)
    {
        _duplicates = duplicates;
        _wake = wake;
        _thread = new Thread(Run) { IsBackground = true, Name = "nbd-socket-watch" };
    }

    /// <summary>Completes with the first socket whose connection ended; never completes while all are healthy.
    /// Faults with <see cref="NbdKernelException"/> if poll(2) itself fails.</summary>
    public Task<NbdSocketEnd> Ended => _ended.Task;

    /// <summary>The duplicates and the eventfd (tests check they are closed once <see cref="WatchThread"/> ended).</summary>
    internal IReadOnlyList<int> Descriptors => [.. _duplicates, _wake];

    internal Thread WatchThread => _thread;

    /// <summary>Starts watching <paramref name="sockets"/>. The caller keeps ownership of them.</summary>
    public static NbdSocketWatch Start(IReadOnlyList<Socket> sockets)
    {
        ArgumentNullException.ThrowIfNull(sockets);
        var duplicates = new List<int>(sockets.Count);
        int wake = -1;
        try
        {
            foreach (Socket socket in sockets)
            {
                int duplicate = Libc.Fcntl(socket.SafeHandle, PollConstants.F_DUPFD_CLOEXEC, 0);
                if (duplicate < 0)
                {
                    throw new NbdKernelException("socket", "fcntl(F_DUPFD_CLOEXEC)", Marshal.GetLastPInvokeError());
                }

                duplicates.Add(duplicate);
            }

            wake = Libc.EventFd(0, PollConstants.EFD_CLOEXEC);
            if (wake < 0)
            {
                throw new NbdKernelException("socket watch", "eventfd", Marshal.GetLastPInvokeError());
            }
        }
        catch
        {
            foreach (int fd in duplicates)
            {
                _ = Libc.Close(fd);
            }

            throw;
        }

        var watch = new NbdSocketWatch([.. duplicates], wake);
        watch._thread.Start();
        return watch;
    }

    /// <summary>Stops watching and closes the duplicates (the watched sockets stay open). Returns without waiting
    /// for the thread, which closes them as it leaves poll(2).</summary>
    public unsafe void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
            {
                return;
            }

            _disposed = true;
            if (!_descriptorsClosed)
            {
                ulong one = 1;
                _ = Libc.Write(_wake, &one, sizeof(ulong));
            }
        }

        _ended.TrySetCanceled();
    }

    private unsafe void Run()
    {
        var fds = new Libc.PollFd[_duplicates.Length + 1];
        for (int i = 0; i < _duplicates.Length; i++)
        {
            fds[i] = new Libc.PollFd { Fd = _duplicates[i], Events = PollConstants.POLLRDHUP };
        }

        fds[^1] = new Libc.PollFd { Fd = _wake, Events = PollConstants.POLLIN };
        try
        {
            while (true)
            {
                int ready;
                fixed (Libc.PollFd* pointer = fds)
                {
                    ready = Libc.Poll(pointer, (nuint)fds.Length, -1);
                }

                if (ready < 0)
                {
                    int errno = Marshal.GetLastPInvokeError();
                    if (errno == Errno.EINTR)
                    {
                        continue;
                    }

                    _ended.TrySetException(new NbdKernelException("socket watch", "poll", errno));
                    return;
                }

                if (fds[^1].ReturnedEvents != 0)
                {
                    return;
                }

                for (int i = 0; i < _duplicates.Length; i++)
                {
                    short events = fds[i].ReturnedEvents;
                    if ((events & EndEvents) != 0)
                    {
                        _ended.TrySetResult(new NbdSocketEnd(i, ReasonOf(events)));
                        return;
                    }
                }
            }
        }
        finally
        {
            lock (_lock)
            {
                _descriptorsClosed = true;
                foreach (int fd in _duplicates)
                {
                    _ = Libc.Close(fd);
                }

                _ = Libc.Close(_wake);
            }
        }
    }

    private static NbdSocketEndReason ReasonOf(short events) =>
        (events & PollConstants.POLLERR) != 0 ? NbdSocketEndReason.Error
        : (events & PollConstants.POLLHUP) != 0 ? NbdSocketEndReason.Closed
        : NbdSocketEndReason.PeerClosed;
}

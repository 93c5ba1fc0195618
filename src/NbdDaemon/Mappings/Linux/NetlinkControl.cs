using System.Collections.Concurrent;
using System.Net.Sockets;
using Nbd.Kernel;

namespace NbdDaemon.Mappings.Linux;

/// <summary>
/// <see cref="INbdNetlinkControl"/> over <see cref="NbdNetlink"/>. It joins the multicast group before the first
/// CONNECT and reads events all the time, so a LINK_DEAD that arrives before anyone waits for it is not lost.
/// RECONFIGURE must repeat the backend identifier given at CONNECT (the driver refuses it otherwise); the caller passes it,
/// because a device adopted after a restart was connected by an earlier process.
/// </summary>
internal sealed class NetlinkControl : INbdNetlinkControl
{
    private readonly NbdNetlink _netlink;
    private readonly NbdNetlinkEvents _events;
    private readonly CancellationTokenSource _closing = new();
    private readonly ConcurrentDictionary<int, TaskCompletionSource> _linkDead = new();
    private readonly Task _reader;
    private volatile Exception? _readerFailure;

    private NetlinkControl(NbdNetlink netlink, NbdNetlinkEvents events)
    {
        _netlink = netlink;
        _events = events;
        _reader = Task.Run(ReadEventsAsync);
    }

    public static NetlinkControl Open()
    {
        var netlink = NbdNetlink.Open();
        try
        {
            return new NetlinkControl(netlink, NbdNetlinkEvents.Subscribe());
        }
        catch
        {
            netlink.Dispose();
            throw;
        }
    }

    public int Connect(NetlinkConnectParameters parameters)
    {
        var index = _netlink.Connect(new NbdNetlinkConnectRequest
        {
            Index = parameters.Index,
            SizeBytes = parameters.SizeBytes,
            BlockSize = parameters.BlockSize,
            Timeout = parameters.Timeout,
            DeadConnectionTimeout = parameters.DeadConnectionTimeout,
            ServerFlags = parameters.ServerFlags,
            Sockets = parameters.Sockets,
            BackendIdentifier = parameters.BackendIdentifier,
        });
        _linkDead.TryRemove(index, out _);
        return index;
    }

    public void Reconfigure(int index, IReadOnlyList<Socket> sockets, string backendIdentifier)
    {
        _linkDead.TryRemove(index, out _);
        _netlink.Reconfigure(new NbdNetlinkReconfigureRequest
        {
            Index = index,
            Sockets = sockets,
            BackendIdentifier = backendIdentifier,
        });
    }

    public void SetTimeout(int index, TimeSpan timeout, string backendIdentifier)
    {
        _netlink.Reconfigure(new NbdNetlinkReconfigureRequest
        {
            Index = index,
            Timeout = timeout,
            BackendIdentifier = backendIdentifier,
        });
    }

    public void Disconnect(int index)
    {
        _netlink.Disconnect(index);
    }

    public bool EventsLost => _readerFailure is not null;

    /// <summary>Each event is seen by one wait: once observed it is consumed, so the next wait is for a new LINK_DEAD.</summary>
    public async Task WaitForLinkDeadAsync(int index, CancellationToken cancellationToken)
    {
        var waiter = LinkDead(index);
        await waiter.Task.WaitAsync(cancellationToken).ConfigureAwait(false);
        _linkDead.TryRemove(new KeyValuePair<int, TaskCompletionSource>(index, waiter));
    }

    public void Dispose()
    {
        _closing.Cancel();
        try
        {
            _reader.Wait(TimeSpan.FromSeconds(2));
        }
        catch (AggregateException)
        {
            // The reader ends by cancellation; nothing to report at shutdown.
        }

        _events.Dispose();
        _netlink.Dispose();
        _closing.Dispose();
    }

    private TaskCompletionSource LinkDead(int index)
    {
        var waiter = _linkDead.GetOrAdd(index, _ => new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously));
        if (_readerFailure is { } failure)
        {
            waiter.TrySetException(failure);
        }

        return waiter;
    }

    private async Task ReadEventsAsync()
    {
        while (!_closing.IsCancellationRequested)
        {
            int index;
            try
            {
                index = await _events.WaitForLinkDeadAsync(_closing.Token);
            }
            catch (OperationCanceledException)
            {
                return;
            }
            catch (Exception e) when (e is NbdKernelException or IOException or InvalidOperationException or SocketException)
            {
                // Without events a dead link would go unnoticed (ENOBUFS: the kernel dropped events for want of room):
                // fail every waiter, so each mapping treats its connection as lost and reconnects with a new control,
                // which subscribes afresh (EventsLost).
                _readerFailure = new MappingException("lost the netlink event subscription: " + e.Message, FailureKind.Transient, e);
                foreach (var waiter in _linkDead.Values)
                {
                    waiter.TrySetException(_readerFailure);
                }

                return;
            }

            LinkDead(index).TrySetResult();
        }
    }
}

using System.Collections.Concurrent;
using System.Net.Sockets;
using Nbd.Kernel;

namespace NbdDaemon.Mappings.Linux;

/// <summary>
/// One /dev/nbdN for the state machine, with its own dedicated thread. The driver remembers the task that first set a
/// socket on a device (<c>nbd-&gt;task_setup</c>) and answers EBUSY to NBD_SET_SOCK from any other task until the
/// device's configuration is released, which never happens while a filesystem holds the device open. So every
/// NBD_SET_SOCK of a mapping's life, and the NBD_DO_IT that follows it, run on this one thread; the calls that must
/// work while NBD_DO_IT blocks it (disconnect, clear socket, clear queue) go straight to the kernel.
/// </summary>
internal sealed class IoctlDevice : IIoctlDevice
{
    private readonly BlockingCollection<Action> _work = [];
    private readonly Thread _thread;
    private NbdDevice _device = null!;

    private IoctlDevice(string? path, Func<int, bool>? mayUse)
    {
        _thread = new Thread(Run) { IsBackground = true, Name = "nbd " + (path ?? "(unused)") };
        _thread.Start();
        try
        {
            OnThread(() => _device = path is not null ? NbdDevice.Open(path)
                : mayUse is not null ? NbdDevice.OpenUnused(mayUse)
                : NbdDevice.OpenUnused());
        }
        catch
        {
            _work.CompleteAdding();
            throw;
        }
    }

    public static IoctlDevice Open(string? path, Func<int, bool>? mayUse = null) => new(path, mayUse);

    public string Path => _device.Path;

    public void SetBlockSize(uint blockSize) => _device.SetBlockSize(blockSize);

    public void SetSizeBytes(ulong size) => _device.SetSizeBytes(size);

    public void SetFlags(ushort flags) => _device.SetFlags(flags);

    public void SetTimeout(TimeSpan timeout) => _device.SetTimeout(timeout);

    public void SetSocket(Socket socket) => OnThread(() => _device.SetSocket(socket));

    /// <summary>
    /// NBD_DO_IT on the device's thread. The task faults when the ioctl failed without a stop of ours (EBUSY: the
    /// device could not start; ETIMEDOUT: a request timed out), so that the failure is named instead of read as a
    /// connection that ended.
    /// </summary>
    public INbdServiceLoop StartServiceLoop(string name) => new ServiceLoop(this, Post(() =>
    {
        NbdServiceLoopResult result = _device.RunServiceLoop();
        if (result.Errno != 0 && !result.StoppedByRequest)
        {
            throw new NbdKernelException(_device.Path, "NBD_DO_IT", result.Errno, result.Description);
        }
    }));

    public void ClearQueue() => _device.ClearQueue();

    public void Disconnect() => _device.Disconnect();

    public void ClearSocket() => _device.ClearSocket();

    public void Dispose()
    {
        _work.CompleteAdding();
        _device?.Dispose();
    }

    private void OnThread(Action action) => Post(action).GetAwaiter().GetResult();

    /// <summary>Queues <paramref name="action"/> on the device's thread; the task ends with it.</summary>
    private Task Post(Action action)
    {
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        _work.Add(() =>
        {
            try
            {
                action();
                done.SetResult();
            }
            catch (Exception e)
            {
                done.SetException(e);
            }
        });
        return done.Task;
    }

    private void Run()
    {
        foreach (var action in _work.GetConsumingEnumerable())
        {
            action();
        }

        _work.Dispose();
    }

    private sealed class ServiceLoop(IoctlDevice owner, Task completion) : INbdServiceLoop
    {
        public Task Completion => completion;

        public void Stop()
        {
            // NBD_DISCONNECT then NBD_CLEAR_SOCK: NBD_DO_IT returns once the kernel let go of the socket.
            owner._device.Disconnect();
            owner._device.ClearSocket();
        }
    }
}

namespace Nbd.Kernel;

/// <summary>NBD_DO_IT running on its own named thread (it blocks for the life of the connection).</summary>
public sealed class NbdServiceLoop
{
    private readonly NbdDevice _device;
    private readonly TaskCompletionSource<NbdServiceLoopResult> _completion =
        new(TaskCreationOptions.RunContinuationsAsynchronously);

    internal NbdServiceLoop(NbdDevice device, string threadName)
    {
        _device = device;
        var thread = new Thread(Run) { IsBackground = true, Name = threadName };
        thread.Start();
    }

    /// <summary>Completes when NBD_DO_IT returns; never faults for kernel errors (they are in the result).</summary>
    public Task<NbdServiceLoopResult> Completion => _completion.Task;

    /// <summary>
    /// Makes NBD_DO_IT return promptly: NBD_DISCONNECT (the kernel sends NBD_CMD_DISC to the server) and then
    /// NBD_CLEAR_SOCK (shuts the sockets down, so a server that never answers cannot keep the loop alive).
    /// Afterwards dispose the device and open it again to reuse the index.
    /// </summary>
    public void Stop() => _device.RequestStop();

    private void Run()
    {
        try
        {
            _completion.TrySetResult(_device.RunServiceLoop());
        }
        catch (Exception ex)
        {
            _completion.TrySetException(ex);
        }
    }
}

using System.Net.Sockets;

namespace Nbd.Kernel.Interop;

/// <summary>
/// Pins the descriptors of sockets handed to the kernel by number (NBD_SOCK_FD in a netlink message) until the
/// request has been answered, so a concurrent Dispose cannot close or recycle a number the kernel is about to look up.
/// </summary>
internal sealed class SocketDescriptorLease : IDisposable
{
    private readonly List<SafeSocketHandle> _pinned = new();

    private SocketDescriptorLease() { }

    /// <summary>Descriptor numbers, in the order of the sockets; meaningful only inside this process.</summary>
    public uint[] Descriptors { get; private set; } = [];

    public static SocketDescriptorLease Acquire(IReadOnlyList<Socket>? sockets)
    {
        var lease = new SocketDescriptorLease();
        if (sockets is null)
        {
            return lease;
        }
        var numbers = new uint[sockets.Count];
        try
        {
            for (int i = 0; i < sockets.Count; i++)
            {
                var handle = sockets[i].SafeHandle;
                bool added = false;
                handle.DangerousAddRef(ref added);
                lease._pinned.Add(handle);
                numbers[i] = checked((uint)(nint)handle.DangerousGetHandle());
            }
        }
        catch
        {
            lease.Dispose();
            throw;
        }
        lease.Descriptors = numbers;
        return lease;
    }

    public void Dispose()
    {
        foreach (var handle in _pinned)
        {
            handle.DangerousRelease();
        }
        _pinned.Clear();
    }
}

using System.Net.Sockets;

namespace Nbd.Kernel;

/// <summary>
/// Checks done before the kernel sees a request, so a caller gets a precise ArgumentException instead of a bare
/// EINVAL from the driver. The rules mirror drivers/block/nbd.c (nbd_get_socket, nbd_set_size).
/// </summary>
internal static class NbdValidation
{
    /// <summary>
    /// nbd_get_socket accepts only TCP and stream unix sockets (older kernels: anything with a shutdown callout,
    /// which UDP lacks); a socket that is not connected would make the first request fail with EPIPE.
    /// </summary>
    public static void ValidateSocket(Socket socket, string paramName)
    {
        ArgumentNullException.ThrowIfNull(socket, paramName);
        if (socket.SocketType != SocketType.Stream)
        {
            throw new ArgumentException($"The nbd driver needs a stream socket; got {socket.SocketType}.", paramName);
        }
        bool supportedFamily = socket.AddressFamily switch
        {
            AddressFamily.Unix => true,
            AddressFamily.InterNetwork or AddressFamily.InterNetworkV6 => socket.ProtocolType == ProtocolType.Tcp,
            _ => false,
        };
        if (!supportedFamily)
        {
            throw new ArgumentException(
                $"The nbd driver needs a TCP or unix stream socket; got {socket.AddressFamily}/{socket.ProtocolType}.", paramName);
        }
        if (!socket.Connected)
        {
            throw new ArgumentException("The socket must be connected (handshake done) before it is handed to the kernel.", paramName);
        }
    }

    /// <summary>nbd_set_size: 0 means the kernel default; otherwise a power of two in 512..PAGE_SIZE.</summary>
    public static void ValidateBlockSize(ulong bytes, int pageSize, string paramName)
    {
        if (bytes < Interop.NbdConstants.MinBlockSize || bytes > (ulong)pageSize || (bytes & (bytes - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(paramName, bytes,
                $"Block size must be a power of two between {Interop.NbdConstants.MinBlockSize} and the page size ({pageSize}).");
        }
    }

    /// <summary>
    /// The longest timeout the driver keeps intact: it stores <c>seconds * HZ</c> in 32 bits (<c>tag_set.timeout</c>,
    /// the queue's <c>rq_timeout</c>), and HZ is at most 1000; a larger value would wrap to a short timeout.
    /// </summary>
    public static readonly TimeSpan MaxTimeout = TimeSpan.FromSeconds(uint.MaxValue / 1000);

    /// <summary>Kernel timeouts are whole seconds (u64 seconds for netlink, unsigned long for the ioctl), at most <see cref="MaxTimeout"/>.</summary>
    public static ulong ToWholeSeconds(TimeSpan timeout, string paramName)
    {
        if (timeout < TimeSpan.Zero)
        {
            throw new ArgumentOutOfRangeException(paramName, timeout, "Timeout must not be negative.");
        }
        if (timeout.Ticks % TimeSpan.TicksPerSecond != 0)
        {
            throw new ArgumentOutOfRangeException(paramName, timeout, "The nbd driver takes whole seconds.");
        }
        if (timeout > MaxTimeout)
        {
            throw new ArgumentOutOfRangeException(paramName, timeout, $"At most {MaxTimeout.TotalSeconds:0} s: the driver keeps the timeout in jiffies in 32 bits, and a larger one would wrap to a short timeout.");
        }
        return (ulong)(timeout.Ticks / TimeSpan.TicksPerSecond);
    }

    /// <summary>Sockets for one netlink request: at least one, each valid.</summary>
    public static void ValidateSockets(IReadOnlyList<Socket>? sockets, bool required, string paramName)
    {
        if (sockets is null || sockets.Count == 0)
        {
            if (required)
            {
                throw new ArgumentException("At least one connected socket is required.", paramName);
            }
            return;
        }
        foreach (var socket in sockets)
        {
            ValidateSocket(socket, paramName);
        }
    }
}

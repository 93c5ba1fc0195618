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
    /// A netlink size (NBD_ATTR_SIZE_BYTES): the driver stores it in a signed loff_t (EINVAL when negative) and does not
    /// round it, and a partial last block fails its reads; <see cref="NbdDevice.WholeBlocks"/> rounds it down.
    /// </summary>
    public static void ValidateSize(ulong bytes, uint blockSize, string paramName)
    {
        if (bytes > long.MaxValue)
        {
            throw new ArgumentOutOfRangeException(paramName, bytes, $"Size {bytes} exceeds the kernel's largest ({long.MaxValue} bytes).");
        }

        if (bytes % blockSize != 0)
        {
            throw new ArgumentOutOfRangeException(paramName, bytes,
                $"Size {bytes} is no whole number of {blockSize}-byte blocks: a partial last block fails its reads; round it down (NbdDevice.WholeBlocks).");
        }
    }

    /// <summary>
    /// NBD_ATTR_BACKEND_IDENTIFIER is compared byte for byte at RECONFIGURE and read back from /sys/block/nbdN/backend
    /// (at most a page, newline included, which <see cref="NbdSysfs.Read"/> trims): an identifier with a NUL (stored cut,
    /// compared whole), other control characters, surrounding white space, or longer than that page could not be
    /// recognised after a restart.
    /// </summary>
    public static void ValidateBackendIdentifier(string? identifier, int pageSize, string paramName)
    {
        if (identifier is null)
        {
            return;
        }

        string? why = identifier.Length == 0 ? "is empty"
            : identifier.Any(char.IsControl) ? "contains a control character (NUL, newline, ...)"
            : identifier.Trim().Length != identifier.Length ? "begins or ends with white space, which reading it back from sysfs loses"
            : System.Text.Encoding.UTF8.GetByteCount(identifier) >= pageSize ? $"is longer than sysfs shows ({pageSize - 1} bytes)"
            : null;
        if (why is not null)
        {
            throw new ArgumentException($"The backend identifier {why}; it must be recognisable when read back from /sys/block/nbdN/backend.", paramName);
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

    /// <summary>
    /// Sockets for one request: at least one (when <paramref name="required"/>), each valid, none the same connection as
    /// another or as one in <paramref name="alreadySet"/>. The driver does not check: two slots on one stream would have
    /// two receive threads reading it, each taking the other's replies ("Wrong magic", a dead connection).
    /// </summary>
    public static void ValidateSockets(IReadOnlyList<Socket>? sockets, bool required, string paramName, IEnumerable<Socket>? alreadySet = null)
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

        // The socket's inode, not its descriptor number: a dup(2) of a socket is the same connection.
        var seen = new HashSet<(ulong, ulong)>();
        foreach (Socket socket in alreadySet ?? [])
        {
            if (Identity(socket) is { } identity)
            {
                seen.Add(identity);
            }
        }

        for (int i = 0; i < sockets.Count; i++)
        {
            if (Identity(sockets[i]) is { } identity && !seen.Add(identity))
            {
                throw new ArgumentException(
                    $"Socket {i} is a connection the device already has (the same socket, or a duplicate of its descriptor): each slot needs a connection of its own.", paramName);
            }
        }
    }

    /// <summary>
    /// What the kernel must not inherit from the caller's own use of the socket: SO_RCVTIMEO and SO_SNDTIMEO. The driver's
    /// receive thread reads with the socket's receive timeout, and a timeout there (a handshake deadline left set, an
    /// idle device) ends the connection ("Receive control failed"); it replaces the send timeout only when a request
    /// timeout is set. Both are cleared: the request timeout alone bounds the driver's waits.
    /// </summary>
    public static void ClearTimeouts(IEnumerable<Socket> sockets)
    {
        foreach (Socket socket in sockets)
        {
            NbdSocketTimeout.Clear(socket, NbdSocketTimeout.Direction.Receive);
            NbdSocketTimeout.Clear(socket);
        }
    }

    private static (ulong, ulong)? Identity(Socket socket)
    {
        bool added = false;
        try
        {
            socket.SafeHandle.DangerousAddRef(ref added);
            return FileIdentity.Of((int)socket.SafeHandle.DangerousGetHandle());
        }
        catch (ObjectDisposedException)
        {
            return null; // ValidateSocket reports a closed socket
        }
        finally
        {
            if (added)
            {
                socket.SafeHandle.DangerousRelease();
            }
        }
    }
}

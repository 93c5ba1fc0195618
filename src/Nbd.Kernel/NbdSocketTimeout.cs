using System.Net.Sockets;
using System.Runtime.InteropServices;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel;

/// <summary>
/// SO_SNDTIMEO of a socket handed to the driver, read and written with raw get/setsockopt. The driver sets
/// <c>sk_sndtimeo</c> to the device's request timeout when it takes a socket (nbd_start_device for CONNECT,
/// nbd_reconnect_socket for RECONFIGURE, both only when a timeout is set), and the socket is shared with our
/// descriptor: cleared before the hand-over and read back afterwards, a non-zero value proves the kernel took it.
/// RECONFIGURE gives no other signal: a socket with no dead slot to fill is dropped and the request still succeeds.
/// .NET's <c>Socket.SendTimeout</c> getter cannot be used: it returns the value the process last set, not the kernel's.
/// </summary>
public static class NbdSocketTimeout
{
    private const int SOL_SOCKET = 1;
    private const int SO_RCVTIMEO = 20;
    private const int SO_SNDTIMEO = 21;

    /// <summary>Which of the socket's two timeouts.</summary>
    public enum Direction
    {
        /// <summary>SO_SNDTIMEO.</summary>
        Send,

        /// <summary>SO_RCVTIMEO: the driver's receive thread waits for replies with it.</summary>
        Receive,
    }

    /// <summary>The socket's current SO_SNDTIMEO (or SO_RCVTIMEO) as the kernel has it; zero means "no timeout".</summary>
    public static unsafe TimeSpan Read(Socket socket, Direction direction = Direction.Send)
    {
        ArgumentNullException.ThrowIfNull(socket);
        var value = default(Libc.TimeVal);
        uint length = (uint)sizeof(Libc.TimeVal);
        if (Libc.GetSockOpt(socket.SafeHandle, SOL_SOCKET, Option(direction), &value, &length) < 0)
        {
            throw new NbdKernelException("socket", $"getsockopt({Name(direction)})", Marshal.GetLastPInvokeError());
        }

        return TimeSpan.FromSeconds(value.Seconds) + TimeSpan.FromMicroseconds(value.Microseconds);
    }

    /// <summary>Sets SO_SNDTIMEO (or SO_RCVTIMEO) to zero (no timeout), so that a later non-zero <see cref="Read"/> of SO_SNDTIMEO can only come from the driver.</summary>
    public static void Clear(Socket socket, Direction direction = Direction.Send) => Set(socket, TimeSpan.Zero, direction);

    /// <summary>
    /// Sets SO_SNDTIMEO (whole microseconds; zero = no timeout). On a socket the driver holds this is how long the
    /// driver's sends may block on it before it gives the connection up.
    /// </summary>
    public static unsafe void Set(Socket socket, TimeSpan timeout, Direction direction = Direction.Send)
    {
        ArgumentNullException.ThrowIfNull(socket);
        ArgumentOutOfRangeException.ThrowIfLessThan(timeout, TimeSpan.Zero);
        long micros = timeout.Ticks / TimeSpan.TicksPerMicrosecond;
        var value = new Libc.TimeVal { Seconds = micros / 1_000_000, Microseconds = micros % 1_000_000 };
        if (Libc.SetSockOpt(socket.SafeHandle, SOL_SOCKET, Option(direction), &value, (uint)sizeof(Libc.TimeVal)) < 0)
        {
            throw new NbdKernelException("socket", $"setsockopt({Name(direction)})", Marshal.GetLastPInvokeError());
        }
    }

    private static int Option(Direction direction) => direction == Direction.Receive ? SO_RCVTIMEO : SO_SNDTIMEO;

    private static string Name(Direction direction) => direction == Direction.Receive ? "SO_RCVTIMEO" : "SO_SNDTIMEO";
}

using System.Net.Sockets;

namespace NbdDaemon.Mappings.Linux;

/// <summary>
/// TCP keepalive on the sockets handed to the kernel. A connection whose server host vanished (power loss, reboot,
/// partition) sends no FIN and no RST; while idle, nothing else would ever notice, and the first I/O after it would
/// wait its whole request timeout. With keepalive the socket itself fails (ETIMEDOUT) after about the configured
/// time; the driver's receive loop sees the error like any other and reports the link dead, so the reconnect
/// happens before an application needs the device. Settings: idle K/2, then 3 probes K/6 apart (each ≥ 1 s), which
/// sums to K. Unix sockets have no keepalive (a dead peer there always shows as EOF); they are left alone.
/// </summary>
internal static class TcpKeepAlive
{
    public const int Probes = 3;

    /// <summary>(idle, interval, probes) in whole seconds for a keepalive budget of <paramref name="budget"/>.</summary>
    public static (int IdleSeconds, int IntervalSeconds, int Probes) Settings(TimeSpan budget) =>
        (Math.Max(1, (int)(budget.TotalSeconds / 2)), Math.Max(1, (int)(budget.TotalSeconds / 6)), Probes);

    /// <summary>Turns keepalive on with <see cref="Settings"/>; zero or a non-TCP socket: nothing is changed.</summary>
    public static void Apply(Socket socket, TimeSpan budget)
    {
        if (budget <= TimeSpan.Zero || socket.AddressFamily is not (AddressFamily.InterNetwork or AddressFamily.InterNetworkV6))
        {
            return;
        }

        (int idle, int interval, int probes) = Settings(budget);
        socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive, true);
        socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime, idle);
        socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval, interval);
        socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount, probes);
    }
}

using System.Net.Sockets;
using System.Text;
using Microsoft.Extensions.Hosting.Systemd;

namespace NbdDaemon.Systemd;

/// <summary>
/// sd_notify(3) over $NOTIFY_SOCKET as the stock SystemdNotifier does it, except that STATUS= and WATCHDOG= cannot block
/// without bound. The notification socket is a datagram socket PID 1 reads: while its queue is full (PID 1 busy with a
/// long reload, or stuck) a send waits until PID 1 reads again, and STATUS= is sent from inside mapping transitions: a
/// mapping reconnecting a device would wait for PID 1. Those give up after <see cref="StatusSendLimit"/> with a
/// SocketException (the caller logs it and sends the next one). READY=1 and STOPPING=1 still wait as long as it takes,
/// as before: a READY=1 dropped would fail the start.
/// </summary>
internal sealed class BoundedSystemdNotifier(string? socketPath) : ISystemdNotifier
{
    /// <summary>How long a STATUS= or WATCHDOG= send may wait for room in systemd's queue.</summary>
    public static readonly TimeSpan StatusSendLimit = TimeSpan.FromSeconds(1);

    public bool IsEnabled => socketPath is not null;

    /// <summary>Over $NOTIFY_SOCKET; disabled when it is unset or unusable (<see cref="NotifySocket.Problem"/>).</summary>
    public static BoundedSystemdNotifier FromEnvironment(Func<string, string?> getVariable) => new(NotifySocket.Usable(getVariable));

    public void Notify(ServiceState state)
    {
        if (socketPath is null)
        {
            return;
        }

        string text = state.ToString();
        using var socket = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        if (!text.StartsWith("READY=", StringComparison.Ordinal) && !text.StartsWith("STOPPING=", StringComparison.Ordinal))
        {
            socket.SendTimeout = (int)StatusSendLimit.TotalMilliseconds; // SO_SNDTIMEO
        }

        // sd_notify: a path starting with '@' is in the abstract namespace.
        string endpoint = socketPath[0] == '@' ? "\0" + socketPath[1..] : socketPath;
        socket.SendTo(Encoding.UTF8.GetBytes(text), new UnixDomainSocketEndPoint(endpoint));
    }
}

using Microsoft.Extensions.Hosting.Systemd;

namespace NbdDaemon.Systemd;

/// <summary>
/// The stock notifier, except that it drops a READY=1 sent after STOPPING=1. A stop (SIGTERM) during the first attempts
/// lets the host finish its start (<see cref="Mappings.MappingSupervisor.StartAsync"/> returns early, so that the host
/// stops the mappings as usual), and the stock SystemdLifetime would then report READY for a daemon that is stopping:
/// systemd, still waiting for the start, would take the unit as started. READY=1 and STOPPING=1 come from the host's
/// SystemdLifetime, which lets an exception end its start ("An error occurred starting the application", at Fatal) and
/// its stop: one refused by the socket (nobody listens at NOTIFY_SOCKET) is logged here instead, as sd_notify(3) returns
/// an error its caller may ignore; the daemon itself is fine. STATUS= and WATCHDOG= failures are the caller's
/// (<see cref="SystemdNotifications"/> logs them once per series).
/// </summary>
internal sealed class StopAwareSystemdNotifier(ISystemdNotifier inner, ILogger? logger = null, string? notifySocket = null) : ISystemdNotifier
{
    private const string Ready = "READY=1";
    private const string Stopping = "STOPPING=1";
    private volatile bool _stopping;

    public bool IsEnabled => inner.IsEnabled;

    public void Notify(ServiceState state)
    {
        string text = state.ToString();
        if (text == Stopping)
        {
            _stopping = true;
        }
        else if (text == Ready && _stopping)
        {
            return;
        }

        if (text is not (Ready or Stopping))
        {
            inner.Notify(state);
            return;
        }

        try
        {
            inner.Notify(state);
        }
        catch (Exception e) when (e is System.Net.Sockets.SocketException or IOException or ObjectDisposedException)
        {
            if (logger is not null)
            {
                SystemdLog.LifecycleNotificationFailed(logger, text, notifySocket ?? "", Words(e));
            }
        }
    }

    /// <summary>.NET's text for a unix socket's ENOENT is "Cannot assign requested address".</summary>
    private static string Words(Exception e) => e is System.Net.Sockets.SocketException s
        ? s.SocketErrorCode switch
        {
            System.Net.Sockets.SocketError.AddressNotAvailable => "no socket there (ENOENT)",
            System.Net.Sockets.SocketError.ConnectionRefused => "nothing listens there (ECONNREFUSED)",
            _ => s.Message,
        }
        : e.Message;
}

internal static partial class SystemdLog
{
    [LoggerMessage(EventId = 132, Level = LogLevel.Warning, Message = "systemd notification {State} not sent to NOTIFY_SOCKET={NotifySocket}: {Reason}; the daemon runs on, but a supervisor waiting for it (Type=notify) will time out")]
    public static partial void LifecycleNotificationFailed(ILogger logger, string state, string notifySocket, string reason);
}

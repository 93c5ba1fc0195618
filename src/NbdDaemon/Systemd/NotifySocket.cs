using System.Text;

namespace NbdDaemon.Systemd;

/// <summary>
/// $NOTIFY_SOCKET as sd_notify(3) takes it: an absolute path, or '@' and a name in the abstract namespace, that fits
/// sockaddr_un's 108-byte sun_path. systemd only ever sets such a value; one set by hand that does not fit used to end
/// the start with an unhandled exception at the first notification. It now turns notifications (and the file
/// descriptor store, which goes over the same socket) off, as sd_notify does by failing, and <see cref="Check"/> says
/// why in a warning.
/// </summary>
internal static partial class NotifySocket
{
    /// <summary>sizeof(sockaddr_un.sun_path): a path and its NUL, or the abstract name after its leading NUL.</summary>
    public const int SunPathBytes = 108;

    /// <summary>The usable value of $NOTIFY_SOCKET; null when it is unset, empty or unusable (<see cref="Problem"/>).</summary>
    public static string? Usable(Func<string, string?> getVariable) =>
        getVariable("NOTIFY_SOCKET") is { Length: > 0 } value && Problem(value) is null ? value : null;

    /// <summary>
    /// Why sd_notify(3) could not send to <paramref name="value"/>; null when it can. The rules are systemd's
    /// sockaddr_un_set_path: at least two characters, '/' or '@' first, and room for a terminating NUL.
    /// </summary>
    public static string? Problem(string value)
    {
        if (value.StartsWith("vsock:", StringComparison.Ordinal))
        {
            return "an AF_VSOCK address, which only a whole machine's init uses to notify its host; this daemon speaks AF_UNIX only";
        }

        if (value[0] is not ('/' or '@') || value.Length < 2)
        {
            return "not an absolute path nor '@' and an abstract name";
        }

        int bytes = Encoding.UTF8.GetByteCount(value);
        return bytes < SunPathBytes ? null : $"{bytes} bytes, more than a socket address holds ({SunPathBytes - 1} at most)";
    }

    /// <summary>Logs a warning at start when $NOTIFY_SOCKET is set but unusable (systemd never sets such a value).</summary>
    public sealed partial class Check(Func<string, string?> getVariable, ILogger<Check> logger) : IHostedService
    {
        public Task StartAsync(CancellationToken cancellationToken)
        {
            if (getVariable("NOTIFY_SOCKET") is { Length: > 0 } value && Problem(value) is string problem)
            {
                Unusable(logger, value, problem);
            }

            return Task.CompletedTask;
        }

        public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

        [LoggerMessage(EventId = 129, Level = LogLevel.Warning, Message = "NOTIFY_SOCKET={NotifySocket} is unusable ({Problem}): no systemd notifications (READY, STATUS, WATCHDOG) and no file descriptor store; under systemd Type=notify the start will time out")]
        private static partial void Unusable(ILogger logger, string notifySocket, string problem);
    }
}

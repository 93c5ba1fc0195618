using System.Globalization;

namespace NbdDaemon.Systemd;

/// <summary>The watchdog systemd asked for (sd_watchdog_enabled(3)): WATCHDOG_USEC, valid only if WATCHDOG_PID is unset or ours.</summary>
/// <param name="Timeout">WatchdogSec as passed in WATCHDOG_USEC; null when the watchdog is off.</param>
internal sealed record WatchdogSettings(TimeSpan? Timeout)
{
    /// <summary>Ping at half the timeout, as sd_watchdog_enabled(3) recommends.</summary>
    public TimeSpan? PingInterval => Timeout / 2;

    public static WatchdogSettings FromEnvironment(Func<string, string?> getVariable, int processId)
    {
        string? pid = getVariable("WATCHDOG_PID");
        if (!string.IsNullOrEmpty(pid) && pid != processId.ToString(CultureInfo.InvariantCulture))
        {
            return new WatchdogSettings((TimeSpan?)null);
        }

        string? usec = getVariable("WATCHDOG_USEC");
        if (!ulong.TryParse(usec, NumberStyles.None, CultureInfo.InvariantCulture, out ulong microseconds) || microseconds == 0
            || microseconds > (ulong)TimeSpan.MaxValue.Ticks / 10)
        {
            return new WatchdogSettings((TimeSpan?)null);
        }

        return new WatchdogSettings(TimeSpan.FromMicroseconds(microseconds));
    }
}

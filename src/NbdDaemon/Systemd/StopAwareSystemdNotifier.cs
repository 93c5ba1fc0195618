using Microsoft.Extensions.Hosting.Systemd;

namespace NbdDaemon.Systemd;

/// <summary>
/// The stock notifier, except that it drops a READY=1 sent after STOPPING=1. A stop (SIGTERM) during the first attempts
/// lets the host finish its start (<see cref="Mappings.MappingSupervisor.StartAsync"/> returns early, so that the host
/// stops the mappings as usual), and the stock SystemdLifetime would then report READY for a daemon that is stopping:
/// systemd, still waiting for the start, would take the unit as started.
/// </summary>
internal sealed class StopAwareSystemdNotifier(ISystemdNotifier inner) : ISystemdNotifier
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

        inner.Notify(state);
    }
}

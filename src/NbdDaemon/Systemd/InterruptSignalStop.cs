using System.Runtime.InteropServices;

namespace NbdDaemon.Systemd;

/// <summary>
/// Ctrl-C (SIGINT) stops the host as SIGTERM does, under systemd's lifetime too. That lifetime, chosen whenever
/// NOTIFY_SOCKET is set (<c>systemd-run -t</c>, <c>run0</c>, a test), handles SIGTERM only; SIGINT then took the
/// runtime's default and ended the process at once, every mapping left as it was. The console lifetime, used
/// otherwise, already does this itself.
/// </summary>
internal sealed class InterruptSignalStop(IHostApplicationLifetime lifetime) : IHostedService, IDisposable
{
    private PosixSignalRegistration? _registration;

    public Task StartAsync(CancellationToken cancellationToken)
    {
        _registration = PosixSignalRegistration.Create(PosixSignal.SIGINT, context =>
        {
            context.Cancel = true; // not the default termination: the host's stop tears the mappings down
            lifetime.StopApplication();
        });
        return Task.CompletedTask;
    }

    // Kept until the process ends: a second Ctrl-C during the stop must not cut the teardown short either.
    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public void Dispose() => _registration?.Dispose();
}

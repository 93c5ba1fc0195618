using System.Runtime.InteropServices;

namespace NbdDaemon.Systemd;

/// <summary>
/// SIGHUP is ignored, with a warning that says what to do instead. Its default action ends the process at once,
/// without a single mapping torn down: Ioctl devices die with their NBD_DO_IT thread, a relay's connection with it,
/// and systemd counts death by SIGHUP as a clean exit, so <c>Restart=on-failure</c> leaves the unit down. Admins send SIGHUP expecting a reload, and the daemon has none
/// (the unit has no ExecReload=): the configuration is read at start.
/// </summary>
internal sealed partial class HangupSignal(ILogger<HangupSignal> logger) : IHostedService, IDisposable
{
    private PosixSignalRegistration? _registration;

    public Task StartAsync(CancellationToken cancellationToken)
    {
        _registration = PosixSignalRegistration.Create(PosixSignal.SIGHUP, context =>
        {
            context.Cancel = true;
            Ignored(logger);
        });
        return Task.CompletedTask;
    }

    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public void Dispose() => _registration?.Dispose();

    [LoggerMessage(EventId = 128, Level = LogLevel.Warning, Message = "SIGHUP ignored: there is no reload, the configuration is read at start; to apply a change run systemctl restart nbd-daemon (with OnStop: Leave, Netlink devices stay mapped across it)")]
    private static partial void Ignored(ILogger logger);
}

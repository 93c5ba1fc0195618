using Serilog;

namespace NbdDaemon.Logging;

/// <summary>Serilog configuration: level and extra settings from the <c>Serilog</c> section, output to journald or console.</summary>
internal static class LoggingSetup
{
    /// <summary>
    /// journald when systemd connected our output to the journal (JOURNAL_STREAM set) and its native socket
    /// exists; console otherwise (interactive runs, containers, tests).
    /// </summary>
    public static bool UseJournald(Func<string, string?> getVariable, string socketPath = JournaldSink.DefaultSocketPath) =>
        !string.IsNullOrEmpty(getVariable("JOURNAL_STREAM")) && Path.Exists(socketPath);

    public static void Configure(LoggerConfiguration logger, IConfiguration configuration, bool journald)
    {
        logger.ReadFrom.Configuration(configuration)
            .Enrich.FromLogContext();
        if (journald)
        {
            logger.WriteTo.Sink(new JournaldSink());
        }
        else
        {
            logger.WriteTo.Console(
                outputTemplate: "{Timestamp:HH:mm:ss.fff} [{Level:u3}] {Message:lj}{NewLine}{Exception}",
                formatProvider: System.Globalization.CultureInfo.InvariantCulture,
                standardErrorFromLevel: Serilog.Events.LogEventLevel.Verbose);
        }
    }
}

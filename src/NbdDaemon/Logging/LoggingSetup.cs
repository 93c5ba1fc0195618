using Serilog;

namespace NbdDaemon.Logging;

/// <summary>Serilog configuration: level and extra settings from the <c>Serilog</c> section, output to journald or console.</summary>
internal static class LoggingSetup
{
    /// <summary>
    /// journald when systemd connected our stderr (where the console output goes) to the journal and its native socket
    /// exists; console otherwise (interactive runs, containers, tests). As systemd.exec(5) asks, $JOURNAL_STREAM
    /// ("DEVICE:INODE" of that connection) is compared with what fstat says of stderr: a variable inherited by a process
    /// whose stderr was redirected since (a shell started from a unit, `nbd-daemon list 2>file`) must not send its
    /// output to the journal instead of where the user pointed it.
    /// </summary>
    public static bool UseJournald(Func<string, string?> getVariable, Func<(ulong Device, ulong Inode)?> standardError, string socketPath = JournaldSink.DefaultSocketPath)
    {
        if (ParseJournalStream(getVariable("JOURNAL_STREAM")) is not { } stream || !Path.Exists(socketPath))
        {
            return false;
        }

        try
        {
            return standardError() == stream;
        }
        catch (PlatformNotSupportedException)
        {
            return true; // stderr cannot be checked here (a C library without fstat): the variable is all there is
        }
    }

    /// <summary>$JOURNAL_STREAM: device and inode numbers in decimal, separated by a colon; null when it is anything else.</summary>
    public static (ulong Device, ulong Inode)? ParseJournalStream(string? value)
    {
        int colon = value?.IndexOf(':', StringComparison.Ordinal) ?? -1;
        return colon > 0
            && ulong.TryParse(value.AsSpan(0, colon), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out ulong device)
            && ulong.TryParse(value.AsSpan(colon + 1), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out ulong inode)
            ? (device, inode)
            : null;
    }

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

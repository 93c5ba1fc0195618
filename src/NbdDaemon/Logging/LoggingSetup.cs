using Serilog;
using Serilog.Settings.Configuration;

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

    /// <summary>
    /// Where Serilog looks for sinks, enrichers and filters, named here: its own assembly (with the settings reader,
    /// which offers <c>With</c>, <c>Logger</c> and <c>FromLogContext</c> for it) and the Console sink's. Left to find
    /// them, it reads the dependency manifest, which the single-file build (deploy/publish.sh) has not, and then
    /// refused any <c>WriteTo</c>. With the list given, a <c>Using</c> section is not read: an entry for an assembly this
    /// build lacks is then refused by name (<see cref="UnresolvedMethodErrors"/>).
    /// </summary>
    public static ConfigurationReaderOptions ReaderOptions =>
        new(typeof(Serilog.ILogger).Assembly, typeof(ConfigurationReaderOptions).Assembly, typeof(ConsoleLoggerConfigurationExtensions).Assembly);

    /// <summary>The sections whose entries name a configuration method (a sink, an enricher, ...) of an assembly.</summary>
    private static readonly string[] MethodSections = ["WriteTo", "AuditTo", "Enrich", "Filter", "Destructure"];

    private const string Levels = "Verbose, Debug, Information, Warning, Error or Fatal";

    /// <summary>
    /// Level values Serilog would refuse, each with its key: Serilog's own message for a bad
    /// <c>MinimumLevel:Override</c> value speaks of an undeclared level switch and names no key.
    /// </summary>
    public static IEnumerable<Configuration.ConfigurationError> LevelErrors(IConfigurationSection serilog)
    {
        IConfigurationSection minimum = serilog.GetSection("MinimumLevel");
        bool switchesDeclared = serilog.GetSection("LevelSwitches").GetChildren().Any();
        var candidates = new List<(IConfigurationSection Section, bool MayNameASwitch)>
        {
            (minimum, false),
            (minimum.GetSection("Default"), false),
        };
        candidates.AddRange(minimum.GetSection("Override").GetChildren().Select(o => (o, true)));
        candidates.AddRange(serilog.GetSection("LevelSwitches").GetChildren().Select(s => (s, false)));
        foreach ((IConfigurationSection section, bool mayNameASwitch) in candidates)
        {
            if (!string.IsNullOrEmpty(section.Value) && !IsLevel(section.Value) && !(mayNameASwitch && switchesDeclared))
            {
                yield return new(section.Path, $"'{section.Value}' is not a level: {Levels}");
            }
        }
    }

    /// <summary>
    /// One of the six names, in any case. Serilog reads a level with Enum.Parse, which also takes a number ("5" is Fatal)
    /// and a list ("Information,Debug" is 2|1, Warning): neither is what an admin writing it meant.
    /// </summary>
    private static bool IsLevel(string value) =>
        Enum.GetNames<Serilog.Events.LogEventLevel>().Contains(value, StringComparer.OrdinalIgnoreCase);

    /// <summary>
    /// One error per <paramref name="selfLog"/> line in which Serilog.Settings.Configuration says it found no method for
    /// an entry, keyed by the entries of <see cref="MethodSections"/> with that name.
    /// </summary>
    public static IEnumerable<Configuration.ConfigurationError> UnresolvedMethodErrors(IConfigurationSection serilog, IEnumerable<string> selfLog)
    {
        const string Marker = "Unable to find a method called ";
        var reported = new HashSet<string>(StringComparer.Ordinal);
        foreach (string line in selfLog)
        {
            int at = line.IndexOf(Marker, StringComparison.Ordinal);
            if (at < 0)
            {
                continue;
            }

            string rest = line[(at + Marker.Length)..];
            int end = rest.IndexOfAny([' ', '.', '\n', '\r']);
            string name = end < 0 ? rest : rest[..end];
            bool argumentsRefused = rest.AsSpan(end < 0 ? rest.Length : end).StartsWith(" for supplied arguments", StringComparison.Ordinal);
            string reason = argumentsRefused
                ? $"'{name}' cannot be called with the arguments given ({ArgumentList(rest)}); it takes {Candidates(rest)}"
                : $"no sink, enricher or filter called '{name}' in this build (it has Serilog's own and the Console sink; under systemd it writes to the journal by itself)";
            bool keyed = false;
            foreach (IConfigurationSection entry in MethodSections.SelectMany(s => serilog.GetSection(s).GetChildren()))
            {
                string? entryName = entry.Value ?? entry["Name"];
                if (entryName == name)
                {
                    keyed = true;
                    if (reported.Add(entry.Path))
                    {
                        yield return new(entry.Path, reason);
                    }
                }
            }

            // An entry nested deeper (a sub-logger's WriteTo) has no top-level key to name.
            if (!keyed && reported.Add(serilog.Path + "\n" + name))
            {
                yield return new(serilog.Path, reason);
            }
        }

        static string ArgumentList(string rest)
        {
            const string Supplied = "for supplied arguments: ";
            int at = rest.IndexOf(Supplied, StringComparison.Ordinal);
            string list = at < 0 ? "" : rest[(at + Supplied.Length)..];
            int end = list.IndexOfAny(['.', '\n', '\r']);
            list = (end < 0 ? list : list[..end]).Trim();
            return list.Length == 0 ? "none" : list;
        }

        static string Candidates(string rest)
        {
            const string Candidate = "Candidate methods are:";
            int at = rest.IndexOf(Candidate, StringComparison.Ordinal);
            return at < 0 ? "other arguments" : string.Join(" or ", rest[(at + Candidate.Length)..].Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
        }
    }

    public static void Configure(LoggerConfiguration logger, IConfiguration configuration, bool journald)
    {
        logger.ReadFrom.Configuration(configuration, ReaderOptions)
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

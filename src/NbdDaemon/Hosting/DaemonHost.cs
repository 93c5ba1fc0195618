using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Hosting.Systemd;
using NbdDaemon.Configuration;
using NbdDaemon.Logging;
using NbdDaemon.Mappings;
using NbdDaemon.Mappings.Linux;
using NbdDaemon.Systemd;
using Serilog;

namespace NbdDaemon.Hosting;

/// <summary>Builds and runs the generic host: configuration, validation (exit 78), logging, systemd, the mappings.</summary>
internal static class DaemonHost
{
    /// <summary>sysexits.h EX_CONFIG; the unit's RestartPreventExitStatus=78 keeps systemd from looping on it.</summary>
    public const int ExitConfigurationError = 78;

    /// <summary>stderr: where the console log goes, and what $JOURNAL_STREAM must name for the journal to be used.</summary>
    private const int StandardErrorFd = 2;

    public const string SystemConfigPath = "/etc/nbd-daemon/appsettings.json";

    /// <summary>Kept below the unit's TimeoutStopSec=30 so we finish (or give up) before systemd sends SIGKILL.</summary>
    public static readonly TimeSpan ShutdownTimeout = TimeSpan.FromSeconds(20);

    public static Task<int> RunAsync(string[] hostArgs, TextWriter error) => RunAsync(hostArgs, error, SystemConfigPath);

    public static async Task<int> RunAsync(string[] hostArgs, TextWriter error, string systemConfigPath)
    {
        HostApplicationBuilder builder;
        IReadOnlyList<MappingOptions> mappings;
        try
        {
            CheckAdminFileVisible(systemConfigPath);
            builder = CreateBuilder(hostArgs, systemConfigPath);
            // Every problem in one run: the mappings' and the logging's.
            var errors = new List<ConfigurationError>();
            mappings = [];
            try
            {
                mappings = new NbdConfigurationReader(new ProtocolUriParser()).Read(builder.Configuration);
            }
            catch (NbdConfigurationException ex)
            {
                errors.AddRange(ex.Errors);
            }

            errors.AddRange(LoggingErrors(builder.Configuration));
            if (errors.Count > 0)
            {
                throw new NbdConfigurationException(errors);
            }
        }
        catch (NbdConfigurationException ex)
        {
            foreach (ConfigurationError e in ex.Errors)
            {
                Cli.CliExit.TryWriteLine(error, $"nbd-daemon: configuration error: {e.Key}: {e.Reason}");
            }

            return ExitConfigurationError;
        }
        catch (Exception ex) when (ex is InvalidDataException or FormatException or IOException or UnauthorizedAccessException)
        {
            // Malformed JSON (the inner exception has the line and position), a file we may not read (the unit keeps no
            // CAP_DAC_OVERRIDE), or a malformed command-line switch: restarting cannot help, so the same exit code.
            Cli.CliExit.TryWriteLine(error, $"nbd-daemon: configuration error: {Describe(ex)}");
            return ExitConfigurationError;
        }

        ConfigureServices(builder, mappings, Environment.GetEnvironmentVariable);
        using IHost host = builder.Build();
        await host.RunAsync();
        return 0;
    }

    private const string LoggingSection = "Serilog";

    /// <summary>
    /// The admin's file is optional, so "absent" must really mean absent: <see cref="File.Exists"/> is also false when
    /// its directory may not be searched (EACCES: the unit keeps no CAP_DAC_OVERRIDE), when a symlink on the way loops,
    /// or when the path is a directory, and the daemon would then run without the admin's mappings. Those throw here
    /// (exit 78, the path named); only ENOENT passes.
    /// </summary>
    private static void CheckAdminFileVisible(string path)
    {
        if (File.Exists(path))
        {
            return;
        }

        FileAttributes attributes;
        try
        {
            attributes = File.GetAttributes(path);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            return;
        }

        if (attributes.HasFlag(FileAttributes.Directory))
        {
            throw new IOException($"{path} is a directory, not the configuration file");
        }
    }

    /// <summary>
    /// Builds a throwaway logger from section <c>Serilog</c>, so that a bad value there (a level spelled <c>Warn</c>) is a
    /// configuration error now, not an exception when the host builds its logger, which systemd would restart forever.
    /// </summary>
    /// <summary>
    /// What Serilog would refuse or skip in the <c>Serilog</c> section, each with its key. Serilog.Settings.Configuration
    /// skips a WriteTo/Enrich/... entry it has no method for (a sink this build does not ship, arguments the method
    /// does not take) with a SelfLog line only: logs the admin asked for would go nowhere. Its SelfLog is
    /// process-wide, so it listens during this probe only.
    /// </summary>
    private static List<ConfigurationError> LoggingErrors(IConfiguration configuration)
    {
        IConfigurationSection section = configuration.GetSection(LoggingSection);
        var errors = new List<ConfigurationError>(LoggingSetup.LevelErrors(section));
        if (errors.Count > 0)
        {
            return errors; // the probe would only stop at the first of them, with Serilog's words
        }

        var selfLog = new List<string>();
        Serilog.Debugging.SelfLog.Enable(line =>
        {
            lock (selfLog)
            {
                selfLog.Add(line);
            }
        });
        try
        {
            var probe = new LoggerConfiguration();
            probe.ReadFrom.Configuration(configuration, LoggingSetup.ReaderOptions);
            probe.CreateLogger().Dispose();
        }
#pragma warning disable CA1031 // Whatever Serilog throws at a configuration it refuses is that configuration's error.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            errors.Add(new ConfigurationError(LoggingSection, Describe(ex)));
        }
        finally
        {
            Serilog.Debugging.SelfLog.Disable();
        }

        lock (selfLog)
        {
            errors.AddRange(LoggingSetup.UnresolvedMethodErrors(section, selfLog));
        }

        return errors;
    }

    /// <summary>The message and every inner message: the JSON provider's own only says which file failed.</summary>
    private static string Describe(Exception ex)
    {
        string text = ex.Message;
        for (Exception? inner = ex.InnerException; inner is not null; inner = inner.InnerException)
        {
            text += " " + inner.Message;
        }

        return text;
    }


    /// <summary>Configuration sources, later ones winning: shipped defaults, the admin's file, environment, command line.</summary>
    public static HostApplicationBuilder CreateBuilder(string[] hostArgs, string systemConfigPath = SystemConfigPath)
    {
        var builder = Host.CreateEmptyApplicationBuilder(new HostApplicationBuilderSettings
        {
            Args = hostArgs,
            ContentRootPath = AppContext.BaseDirectory,
            ApplicationName = "nbd-daemon",
        });
        builder.Configuration
            .AddJsonFile(Path.Combine(AppContext.BaseDirectory, "appsettings.json"), optional: true, reloadOnChange: false)
            .AddJsonFile(systemConfigPath, optional: true, reloadOnChange: false)
            .AddEnvironmentVariables()
            .AddCommandLine(hostArgs);
        return builder;
    }

    public static void ConfigureServices(HostApplicationBuilder builder, IReadOnlyList<MappingOptions> mappings, Func<string, string?> getVariable)
    {
        IServiceCollection services = builder.Services;
        services.Configure<HostOptions>(o => o.ShutdownTimeout = ShutdownTimeout);
        services.AddSingleton(TimeProvider.System);
        services.AddSingleton(mappings);

        services.TryAddSingleton<IFileDescriptorStore>(sp => SystemdFileDescriptorStore.FromEnvironment(
            getVariable, Environment.ProcessId, sp.GetRequiredService<ILoggerFactory>().CreateLogger("NbdDaemon.Systemd.FileDescriptorStore")));
        services.TryAddSingleton<INbdConnector>(sp => new RelayingConnector(
            new ProtocolConnector(sp.GetRequiredService<TimeProvider>()), sp.GetRequiredService<ILoggerFactory>(), sp.GetRequiredService<TimeProvider>(),
            sp.GetRequiredService<IFileDescriptorStore>()));
        services.TryAddSingleton<INbdKernel, LinuxKernel>();

        services.AddSingleton(sp => new MappingSupervisor(
            sp.GetRequiredService<IReadOnlyList<MappingOptions>>(), sp.GetRequiredService<INbdConnector>(),
            sp.GetRequiredService<INbdKernel>(), sp.GetRequiredService<TimeProvider>(), sp.GetRequiredService<ILoggerFactory>(),
            store: sp.GetRequiredService<IFileDescriptorStore>()));

        // The stock AddSystemd() only activates when our parent is systemd; NOTIFY_SOCKET is the actual contract
        // (and lets tests and `systemd-run`-like supervisors receive the same notifications).
        services.AddSingleton<ISystemdNotifier>(sp => new StopAwareSystemdNotifier(
            BoundedSystemdNotifier.FromEnvironment(getVariable), sp.GetRequiredService<ILoggerFactory>().CreateLogger("NbdDaemon.Systemd"), NotifySocket.Usable(getVariable)));
        services.AddHostedService(sp => new NotifySocket.Check(getVariable, sp.GetRequiredService<ILogger<NotifySocket.Check>>()));
        if (SystemdHelpers.IsSystemdService() || !string.IsNullOrEmpty(getVariable("NOTIFY_SOCKET")))
        {
            services.AddSingleton<IHostLifetime, SystemdLifetime>();
            services.AddHostedService<InterruptSignalStop>();
        }

        services.AddHostedService<HangupSignal>();

        services.AddSingleton(WatchdogSettings.FromEnvironment(getVariable, Environment.ProcessId));
        // Order matters: notifications first (watchdog pings during the first attempts), supervisor second
        // (its StartAsync returns when every mapping was tried; only then does the host signal READY=1).
        services.AddHostedService<SystemdNotifications>();
        services.AddHostedService(sp => sp.GetRequiredService<MappingSupervisor>());

        bool journald = LoggingSetup.UseJournald(getVariable, () => Nbd.Kernel.FileIdentity.Of(StandardErrorFd));
        IConfiguration configuration = builder.Configuration;
        services.AddSerilog((_, logger) => LoggingSetup.Configure(logger, configuration, journald));
    }
}

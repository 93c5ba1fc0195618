using System.Net.Sockets;
using NbdDaemon.Hosting;

namespace NbdDaemon.Tests.Hosting;

/// <summary>Configuration the host cannot use ends the daemon with exit 78 and a line that says why, before any mapping starts.</summary>
public sealed class DaemonHostTests
{
    private static async Task<(int Exit, string Error)> RunAsync(string systemConfigPath, params string[] args)
    {
        var error = new StringWriter();
        int exit = await DaemonHost.RunAsync(args, error, systemConfigPath).WaitAsync(TimeSpan.FromSeconds(30));
        return (exit, error.ToString());
    }

    [Fact]
    public async Task Run_MalformedAdminFile_Exits78WithFileAndPosition()
    {
        using var dir = new TempDirectory();
        string path = dir.File("appsettings.json");
        await File.WriteAllTextAsync(path, "{ \"Nbd\": { \"Mappings\": [ }");

        (int exit, string error) = await RunAsync(path);

        Assert.Equal(DaemonHost.ExitConfigurationError, exit);
        Assert.Contains(path, error, StringComparison.Ordinal);
        // The provider's own message names only the file; where in it comes from the JSON reader.
        Assert.True(error.Contains("LineNumber: 0 | BytePositionInLine: 25", StringComparison.Ordinal), error);
    }

    [Fact]
    public async Task Run_AdminFileThatCannotBeRead_Exits78NamingIt()
    {
        // open(2) of a socket fails (ENXIO), as a file the unit may not read fails (EACCES: no CAP_DAC_OVERRIDE there).
        using var dir = new TempDirectory();
        string path = dir.File("appsettings.json");
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        socket.Bind(new UnixDomainSocketEndPoint(path));

        (int exit, string error) = await RunAsync(path);

        Assert.Equal(DaemonHost.ExitConfigurationError, exit);
        Assert.Contains(path, error, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Run_AdminFileBehindALoopingSymlink_Exits78NamingItInsteadOfRunningWithoutIt()
    {
        // As a directory the daemon may not search (EACCES, which root in a test does not get): File.Exists says false,
        // and the optional file would be skipped without a word.
        using var dir = new TempDirectory();
        File.CreateSymbolicLink(dir.File("etc"), dir.File("etc"));
        string path = Path.Combine(dir.File("etc"), "appsettings.json");

        (int exit, string error) = await RunAsync(path);

        Assert.Equal(DaemonHost.ExitConfigurationError, exit);
        Assert.Contains(path, error, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Run_AdminFileIsADirectory_Exits78NamingIt()
    {
        using var dir = new TempDirectory();
        string path = dir.File("appsettings.json");
        Directory.CreateDirectory(path);

        (int exit, string error) = await RunAsync(path);

        Assert.Equal(DaemonHost.ExitConfigurationError, exit);
        Assert.Contains(path + " is a directory", error, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Run_NoAdminFileAndNoDirectory_NotAConfigurationError()
    {
        using var dir = new TempDirectory();

        // Without mappings the daemon would run (and wait for a stop): a pre-cancelled run is not available here, so the
        // check is that the configuration step passes, through the same probe the run uses.
        (int exit, string error) = await RunAsync(Path.Combine(dir.File("absent"), "appsettings.json"), "--Nbd:Mappings:0:Name=x", "--Nbd:Mappings:0:Uri=bogus://");

        Assert.Equal(DaemonHost.ExitConfigurationError, exit);
        Assert.DoesNotContain("appsettings.json", error, StringComparison.Ordinal);
        Assert.Contains("Uri", error, StringComparison.Ordinal);
    }

    /// <summary>Serilog's own message for a bad Override value spoke of an undeclared level switch and named no key.</summary>
    [Theory]
    [InlineData("--Serilog:MinimumLevel:Default=Warn", "Serilog:MinimumLevel:Default: 'Warn' is not a level")]
    [InlineData("--Serilog:MinimumLevel=Warn", "Serilog:MinimumLevel: 'Warn' is not a level")]
    [InlineData("--Serilog:MinimumLevel:Override:NbdDaemon=Loud", "Serilog:MinimumLevel:Override:NbdDaemon: 'Loud' is not a level")]
    [InlineData("--Serilog:LevelSwitches:$quiet=Hush", "Serilog:LevelSwitches:$quiet: 'Hush' is not a level")]
    public async Task Run_BadLoggingLevel_Exits78NamingTheKey(string setting, string expected)
    {
        using var dir = new TempDirectory();

        (int exit, string error) = await RunAsync(dir.File("absent.json"), setting);

        Assert.Equal(DaemonHost.ExitConfigurationError, exit);
        Assert.Equal($"nbd-daemon: configuration error: {expected}: Verbose, Debug, Information, Warning, Error or Fatal{Environment.NewLine}", error);
    }

    /// <summary>
    /// Serilog skips an entry it has no method for with a SelfLog line only: the daemon ran, and logs the admin asked
    /// for (a File sink this build does not ship) went nowhere.
    /// </summary>
    [Theory]
    [InlineData("Serilog:WriteTo:0", "File", "--Serilog:WriteTo:0:Name=File", "--Serilog:WriteTo:0:Args:path=/var/log/nbd.log")]
    [InlineData("Serilog:WriteTo:0", "File", "--Serilog:WriteTo:0=File")]
    [InlineData("Serilog:Enrich:0", "WithMachineName", "--Serilog:Enrich:0=WithMachineName")]
    [InlineData("Serilog:WriteTo:1", "Seq", "--Serilog:WriteTo:0=Console", "--Serilog:WriteTo:1:Name=Seq")]
    [InlineData("Serilog:AuditTo:0", "Seq", "--Serilog:AuditTo:0:Name=Seq")]
    public async Task Run_SinkOrEnricherThisBuildDoesNotShip_Exits78NamingTheEntry(string key, string name, params string[] settings)
    {
        using var dir = new TempDirectory();

        (int exit, string error) = await RunAsync(dir.File("absent.json"), settings);

        Assert.Equal(DaemonHost.ExitConfigurationError, exit);
        Assert.Equal(
            $"nbd-daemon: configuration error: {key}: no sink, enricher or filter called '{name}' in this build (it has Serilog's own and the Console sink; under systemd it writes to the journal by itself){Environment.NewLine}",
            error);
    }

    /// <summary>A sub-logger's sink has no top-level entry to name: the section is named, not nothing said.</summary>
    [Fact]
    public async Task Run_NestedSinkThisBuildDoesNotShip_Exits78NamingTheSection()
    {
        using var dir = new TempDirectory();

        (int exit, string error) = await RunAsync(dir.File("absent.json"),
            "--Serilog:WriteTo:0:Name=Logger", "--Serilog:WriteTo:0:Args:configureLogger:WriteTo:0:Name=File");

        Assert.Equal(DaemonHost.ExitConfigurationError, exit);
        Assert.StartsWith("nbd-daemon: configuration error: Serilog: no sink, enricher or filter called 'File' in this build", error, StringComparison.Ordinal);
    }

    /// <summary>Every problem in one run: a mapping's error hid the logging's, so an admin fixed them one start at a time.</summary>
    [Fact]
    public async Task Run_MappingAndLoggingErrors_AllReportedAtOnce()
    {
        using var dir = new TempDirectory();

        (int exit, string error) = await RunAsync(dir.File("absent.json"),
            "--Nbd:Mappings:0:Name=x", "--Nbd:Mappings:0:Uri=bogus://", "--Serilog:WriteTo:0=File");

        Assert.Equal(DaemonHost.ExitConfigurationError, exit);
        Assert.Contains("configuration error: Nbd:Mappings:0:Uri: ", error, StringComparison.Ordinal);
        Assert.Contains("configuration error: Serilog:WriteTo:0: no sink, enricher or filter called 'File'", error, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Run_SinkGivenAnArgumentItDoesNotTake_Exits78NamingTheEntryAndArgument()
    {
        using var dir = new TempDirectory();

        (int exit, string error) = await RunAsync(dir.File("absent.json"), "--Serilog:Enrich:0:Name=With", "--Serilog:Enrich:0:Args:enrich=x");

        Assert.Equal(DaemonHost.ExitConfigurationError, exit);
        Assert.Equal($"nbd-daemon: configuration error: Serilog:Enrich:0: 'With' cannot be called with the arguments given (enrich); it takes With(enricher){Environment.NewLine}", error);
    }
}

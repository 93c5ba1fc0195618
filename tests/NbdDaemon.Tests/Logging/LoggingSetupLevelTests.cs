using Microsoft.Extensions.Configuration;
using NbdDaemon.Logging;

namespace NbdDaemon.Tests.Logging;

public sealed class LoggingSetupLevelTests
{
    private static IConfigurationSection Serilog(params (string Key, string Value)[] values) =>
        new ConfigurationBuilder().AddInMemoryCollection(values.Select(v => KeyValuePair.Create("Serilog:" + v.Key, (string?)v.Value))).Build().GetSection("Serilog");

    /// <summary>The six names, in any case.</summary>
    [Theory]
    [InlineData("MinimumLevel:Default", "Warning")]
    [InlineData("MinimumLevel:Default", "debug")]
    [InlineData("MinimumLevel", "Fatal")]
    [InlineData("MinimumLevel:Override:Microsoft", "warning")]
    [InlineData("LevelSwitches:$quiet", "Error")]
    public void LevelErrors_SerilogLevels_None(string key, string value) =>
        Assert.Empty(LoggingSetup.LevelErrors(Serilog((key, value))));

    [Fact]
    public void LevelErrors_OverrideNamingADeclaredSwitch_LeftToSerilog() =>
        Assert.Empty(LoggingSetup.LevelErrors(Serilog(("LevelSwitches:$quiet", "Error"), ("MinimumLevel:Override:Microsoft", "$quiet"))));

    /// <summary>
    /// Not a name. Serilog's Enum.Parse would also take a number ("3" is Warning, "7" a level above Fatal: nothing logged)
    /// and a list ("Information,Debug" is 2|1, Warning): not what an admin writing it meant.
    /// </summary>
    [Theory]
    [InlineData("MinimumLevel:Override:Microsoft", "Warn")]
    [InlineData("MinimumLevel:Default", "7")]
    [InlineData("MinimumLevel:Default", "Info")]
    [InlineData("MinimumLevel:Override:Microsoft", "3")]
    [InlineData("MinimumLevel:Default", "Information,Debug")]
    [InlineData("LevelSwitches:$quiet", "5")]
    public void LevelErrors_NotALevel_NamesTheKey(string key, string value)
    {
        NbdDaemon.Configuration.ConfigurationError error = Assert.Single(LoggingSetup.LevelErrors(Serilog((key, value))));
        Assert.Equal("Serilog:" + key, error.Key);
        Assert.Equal($"'{value}' is not a level: Verbose, Debug, Information, Warning, Error or Fatal", error.Reason);
    }
}

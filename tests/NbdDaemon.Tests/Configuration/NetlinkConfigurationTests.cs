using Microsoft.Extensions.Configuration;
using NbdDaemon.Configuration;
using NbdDaemon.Mappings.Linux;

namespace NbdDaemon.Tests.Configuration;

/// <summary>Netlink-specific rules: DeadConnectionTimeout default, no zero timeouts, OnStop; KeepAlive and Relay (both interfaces).</summary>
public sealed class NetlinkConfigurationTests
{
    private static IReadOnlyList<MappingOptions> Read(params (string Key, string Value)[] values) =>
        new NbdConfigurationReader(new ProtocolUriParser()).Read(
            new ConfigurationBuilder().AddInMemoryCollection(values.Select(v => new KeyValuePair<string, string?>(v.Key, v.Value))).Build());

    private static ConfigurationError SingleError(params (string Key, string Value)[] values) =>
        Assert.Single(Assert.Throws<NbdConfigurationException>(() => Read(values)).Errors);

    [Fact]
    public void Read_NetlinkWithoutTimeouts_Defaults10sRequest120sDeadConnectionAndDisconnectOnStop()
    {
        MappingOptions m = Assert.Single(Read(("Nbd:Mappings:0:Name", "data"), ("Nbd:Mappings:0:Uri", "nbd://server/disk"), ("Nbd:Mappings:0:Interface", "Netlink")));

        Assert.Equal(TimeSpan.FromSeconds(10), m.Timeout);
        Assert.Equal(TimeSpan.FromSeconds(120), m.DeadConnectionTimeout);
        Assert.Equal(StopAction.Disconnect, m.OnStop);
    }

    [Fact]
    public void Read_NetlinkWithTimeout_KeepsIt()
    {
        MappingOptions m = Assert.Single(Read(
            ("Nbd:Mappings:0:Name", "data"), ("Nbd:Mappings:0:Uri", "nbd://server/disk"), ("Nbd:Mappings:0:Interface", "Netlink"),
            ("Nbd:Mappings:0:Timeout", "00:00:45")));

        Assert.Equal(TimeSpan.FromSeconds(45), m.Timeout);
    }

    [Fact]
    public void Read_NetlinkOnStopLeave_Parsed()
    {
        MappingOptions m = Assert.Single(Read(
            ("Nbd:Mappings:0:Name", "data"), ("Nbd:Mappings:0:Uri", "nbd://server/disk"), ("Nbd:Mappings:0:Interface", "Netlink"),
            ("Nbd:Mappings:0:OnStop", "leave")));

        Assert.Equal(StopAction.Leave, m.OnStop);
    }

    [Theory]
    [InlineData("Ioctl", null, 30)]
    [InlineData("Netlink", null, 30)]
    [InlineData("Netlink", "0", 0)]
    [InlineData("Ioctl", "00:00:00", 0)]
    [InlineData("Netlink", "00:00:03", 3)]
    [InlineData("Ioctl", "00:10:00", 600)]
    [InlineData("Ioctl", "18:12:15", 65535)]
    public void Read_KeepAlive_DefaultZeroOrValue(string kernelInterface, string? value, int expectedSeconds)
    {
        var values = new List<(string, string)> { ("Nbd:Mappings:0:Name", "data"), ("Nbd:Mappings:0:Uri", "nbd://server/disk"), ("Nbd:Mappings:0:Interface", kernelInterface) };
        if (value is not null)
        {
            values.Add(("Nbd:Mappings:0:KeepAlive", value));
        }

        Assert.Equal(TimeSpan.FromSeconds(expectedSeconds), Assert.Single(Read([.. values])).KeepAlive);
    }

    [Theory]
    [InlineData("Ioctl", null, false)]
    [InlineData("Netlink", null, false)]
    [InlineData("Netlink", "true", true)]
    [InlineData("Ioctl", "True", true)]
    [InlineData("Netlink", "false", false)]
    public void Read_Relay_OffByDefaultOrAsGiven(string kernelInterface, string? value, bool expected)
    {
        var values = new List<(string, string)> { ("Nbd:Mappings:0:Name", "data"), ("Nbd:Mappings:0:Uri", "nbd://server/disk"), ("Nbd:Mappings:0:Interface", kernelInterface) };
        if (value is not null)
        {
            values.Add(("Nbd:Mappings:0:Relay", value));
        }

        Assert.Equal(expected, Assert.Single(Read([.. values])).Relay);
    }

    [Theory]
    [InlineData("Netlink", "Relay", "yes", "Nbd:Mappings:0:Relay", "'yes' must be true or false")]
    [InlineData("Netlink", "KeepAlive", "00:00:02", "Nbd:Mappings:0:KeepAlive", "'00:00:02' must be 0 (off) or at least 00:00:03")]
    [InlineData("Ioctl", "KeepAlive", "18:12:16", "Nbd:Mappings:0:KeepAlive", "'18:12:16' is more than 18:12:15: the first probe comes after half of it, and Linux takes at most 32767 s there (TCP_KEEPIDLE)")]
    [InlineData("Ioctl", "KeepAlive", "often", "Nbd:Mappings:0:KeepAlive", "'often' must be a positive TimeSpan")]
    [InlineData("Netlink", "Timeout", "00:00:00", "Nbd:Mappings:0:Timeout", "greater than zero with Interface=Netlink: requests in flight")]
    [InlineData("Netlink", "DeadConnectionTimeout", "0", "Nbd:Mappings:0:DeadConnectionTimeout", "greater than zero: with 0 the kernel fails I/O at once")]
    [InlineData("Netlink", "DeadConnectionTimeout", "00:00:00.5", "Nbd:Mappings:0:DeadConnectionTimeout", "'00:00:00.5' must be whole seconds")]
    [InlineData("Netlink", "Timeout", "00:00:09.999", "Nbd:Mappings:0:Timeout", "'00:00:09.999' must be whole seconds")]
    [InlineData("Ioctl", "OnStop", "Leave", "Nbd:Mappings:0:OnStop", "Leave needs Interface=Netlink")]
    [InlineData("Netlink", "OnStop", "Detach", "Nbd:Mappings:0:OnStop", "unknown value 'Detach' (Disconnect or Leave)")]
    public void Read_NetlinkRules_ErrorNamesKeyAndWhy(string kernelInterface, string key, string value, string expectedKey, string expectedReason)
    {
        ConfigurationError error = SingleError(
            ("Nbd:Mappings:0:Name", "data"), ("Nbd:Mappings:0:Uri", "nbd://server/disk"), ("Nbd:Mappings:0:Interface", kernelInterface),
            ("Nbd:Mappings:0:" + key, value));

        Assert.Equal(expectedKey, error.Key);
        Assert.Contains(expectedReason, error.Reason, StringComparison.Ordinal);
    }
}

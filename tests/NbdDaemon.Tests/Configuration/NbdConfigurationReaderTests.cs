using Microsoft.Extensions.Configuration;
using NbdDaemon.Configuration;
using NbdDaemon.Mappings.Linux;

namespace NbdDaemon.Tests.Configuration;

public sealed class NbdConfigurationReaderTests
{
    private static IReadOnlyList<MappingOptions> Read(params (string Key, string Value)[] values) =>
        new NbdConfigurationReader(new ProtocolUriParser()).Read(
            new ConfigurationBuilder().AddInMemoryCollection(values.Select(v => new KeyValuePair<string, string?>(v.Key, v.Value))).Build());

    private static ConfigurationError SingleError(params (string Key, string Value)[] values) =>
        Assert.Single(Assert.Throws<NbdConfigurationException>(() => Read(values)).Errors);

    [Fact]
    public void Read_MinimalMapping_AppliesDefaults()
    {
        MappingOptions m = Assert.Single(Read(("Nbd:Mappings:0:Name", "data"), ("Nbd:Mappings:0:Uri", "nbd://server.example/disk")));

        Assert.Equal("data", m.Name);
        Assert.Equal(new MappingEndpoint("server.example:10809", "disk"), m.Endpoint);
        Assert.Null(m.Device);
        Assert.Equal(KernelInterface.Ioctl, m.Interface);
        Assert.Null(m.BlockSize);
        Assert.Equal(TimeSpan.FromSeconds(30), m.Timeout);
        Assert.Null(m.DeadConnectionTimeout);
        Assert.Equal(1, m.Connections);
        Assert.False(m.ReadOnly);
        Assert.Equal(new ReconnectOptions(true, TimeSpan.FromSeconds(1), TimeSpan.FromMinutes(1), 0), m.Reconnect);
        Assert.Equal("nbd-daemon:data", m.BackendIdentifier);
    }

    [Fact]
    public void Read_EveryKeySet_ParsesAll()
    {
        MappingOptions m = Assert.Single(Read(
            ("Nbd:Mappings:0:Name", "logs"),
            ("Nbd:Mappings:0:Uri", "nbd+unix:///vol?socket=/run/nbd.sock"),
            ("Nbd:Mappings:0:Device", "/dev/nbd4"),
            ("Nbd:Mappings:0:Interface", "netlink"),
            ("Nbd:Mappings:0:BlockSize", "512"),
            ("Nbd:Mappings:0:Timeout", "00:00:10"),
            ("Nbd:Mappings:0:DeadConnectionTimeout", "00:02:00"),
            ("Nbd:Mappings:0:Connections", "4"),
            ("Nbd:Mappings:0:ReadOnly", "true"),
            ("Nbd:Mappings:0:Reconnect:Enabled", "false"),
            ("Nbd:Mappings:0:Reconnect:InitialDelay", "00:00:02"),
            ("Nbd:Mappings:0:Reconnect:MaxDelay", "00:05:00"),
            ("Nbd:Mappings:0:Reconnect:MaxAttempts", "7")));

        Assert.Equal(new MappingEndpoint("unix:/run/nbd.sock", "vol"), m.Endpoint);
        Assert.Equal("/dev/nbd4", m.Device);
        Assert.Equal(KernelInterface.Netlink, m.Interface);
        Assert.Equal(512u, m.BlockSize);
        Assert.Equal(TimeSpan.FromSeconds(10), m.Timeout);
        Assert.Equal(TimeSpan.FromMinutes(2), m.DeadConnectionTimeout);
        Assert.Equal(4, m.Connections);
        Assert.True(m.ReadOnly);
        Assert.Equal(new ReconnectOptions(false, TimeSpan.FromSeconds(2), TimeSpan.FromMinutes(5), 7), m.Reconnect);
    }

    [Fact]
    public void Read_NoMappings_Empty() => Assert.Empty(Read());

    [Fact]
    public void Read_FiveDigitDevice_AcceptedAsConnectTakesIt() =>
        Assert.Equal("/dev/nbd10000", Assert.Single(Read(("Nbd:Mappings:0:Name", "d"), ("Nbd:Mappings:0:Uri", "nbd://h/e"), ("Nbd:Mappings:0:Device", "/dev/nbd10000"))).Device);

    /// <summary>
    /// A setting given as an object or a list has no value of its own: it was read as absent, and its default applied
    /// without a word (any free device, read-write, ioctl).
    /// </summary>
    [Theory]
    [InlineData("Nbd:Mappings:0:Device:0", "/dev/nbd0", "Nbd:Mappings:0:Device")]
    [InlineData("Nbd:Mappings:0:ReadOnly:0", "true", "Nbd:Mappings:0:ReadOnly")]
    [InlineData("Nbd:Mappings:0:Interface:Name", "Netlink", "Nbd:Mappings:0:Interface")]
    [InlineData("Nbd:Mappings:0:Timeout:Seconds", "5", "Nbd:Mappings:0:Timeout")]
    [InlineData("Nbd:Mappings:0:Reconnect:MaxDelay:0", "00:00:05", "Nbd:Mappings:0:Reconnect:MaxDelay")]
    public void Read_SettingGivenAsObjectOrList_ErrorNamesTheKey(string key, string value, string expectedKey)
    {
        ConfigurationError error = SingleError(("Nbd:Mappings:0:Name", "data"), ("Nbd:Mappings:0:Uri", "nbd://h/e"), (key, value));

        Assert.Equal(expectedKey, error.Key);
        Assert.Equal("must be a single value, not an object or a list", error.Reason);
    }

    [Fact]
    public void Read_JsonListAsDevice_Refused()
    {
        const string json = """{ "Nbd": { "Mappings": [ { "Name": "data", "Uri": "nbd://h/e", "Device": [ "/dev/nbd0" ], "ReadOnly": [ true ] } ] } }""";
        IConfiguration configuration = new ConfigurationBuilder().AddJsonStream(new MemoryStream(System.Text.Encoding.UTF8.GetBytes(json))).Build();

        var errors = Assert.Throws<NbdConfigurationException>(() => new NbdConfigurationReader(new ProtocolUriParser()).Read(configuration)).Errors;

        Assert.Equal(["Nbd:Mappings:0:Device", "Nbd:Mappings:0:ReadOnly"], errors.Select(e => e.Key).Order(StringComparer.Ordinal));
    }

    /// <summary>
    /// JSON null and an empty object have neither a value nor children: they read as "not set" and the default applied
    /// (the mapping went read-write with reconnect on). An empty section (Reconnect) is fine; an empty list leaves no key
    /// at all in .NET's JSON provider, so it cannot be told from an absent one.
    /// </summary>
    [Fact]
    public void Read_JsonNullOrEmptyObjectAsSetting_Refused()
    {
        const string json = """
            { "Nbd": { "Mappings": [ { "Name": "data", "Uri": "nbd://h/e", "ReadOnly": {}, "KeepAlive": null,
              "Reconnect": { "Enabled": null } },
              { "Name": "other", "Uri": "nbd://h/f", "Reconnect": {}, "Timeout": null } ] } }
            """;
        IConfiguration configuration = new ConfigurationBuilder().AddJsonStream(new MemoryStream(System.Text.Encoding.UTF8.GetBytes(json))).Build();

        var errors = Assert.Throws<NbdConfigurationException>(() => new NbdConfigurationReader(new ProtocolUriParser()).Read(configuration)).Errors;

        Assert.Equal(
            ["Nbd:Mappings:0:KeepAlive", "Nbd:Mappings:0:ReadOnly", "Nbd:Mappings:0:Reconnect:Enabled", "Nbd:Mappings:1:Timeout"],
            errors.Select(e => e.Key).Order(StringComparer.Ordinal));
        Assert.All(errors, e => Assert.Equal("has no value (JSON null or an empty object): leave the key out for its default", e.Reason));
    }

    [Fact]
    public void Read_EnvironmentVariableNamedNbd_NotAnError() =>
        // Environment variables come without a prefix: NBD=/dev/nbd0 in the daemon's environment is "Nbd" with a value.
        Assert.Single(Read(("NBD", "/dev/nbd0"), ("Nbd:Mappings:0:Name", "d"), ("Nbd:Mappings:0:Uri", "nbd://h/e")));

    [Theory]
    [InlineData("Uri", "http://x/y", "Nbd:Mappings:1:Uri", "unsupported scheme 'http'")]
    [InlineData("Uri", "nbd://host:99999/e", "Nbd:Mappings:1:Uri", "not a number from 1 to 65535")]
    [InlineData("Uri", "nbd+unix:///e", "Nbd:Mappings:1:Uri", "socket=PATH")]
    [InlineData("Interface", "Ioctl2", "Nbd:Mappings:1:Interface", "unknown interface 'Ioctl2'")]
    [InlineData("Interface", "1", "Nbd:Mappings:1:Interface", "unknown interface '1'")]
    [InlineData("Device", "/dev/sda", "Nbd:Mappings:1:Device", "must be /dev/nbdN")]
    [InlineData("Device", "/dev/nbd1000000", "Nbd:Mappings:1:Device", "'/dev/nbd1000000' must be /dev/nbdN (N of up to 6 digits, no leading zero)")]
    [InlineData("BlockSize", "1024x", "Nbd:Mappings:1:BlockSize", "power of two")]
    [InlineData("BlockSize", "8192", "Nbd:Mappings:1:BlockSize", "power of two from 512 to 4096")]
    [InlineData("BlockSize", "768", "Nbd:Mappings:1:BlockSize", "power of two")]
    [InlineData("Timeout", "30 seconds", "Nbd:Mappings:1:Timeout", "positive TimeSpan")]
    [InlineData("Timeout", "-00:00:01", "Nbd:Mappings:1:Timeout", "positive TimeSpan")]
    [InlineData("Timeout", "00:30", "Nbd:Mappings:1:Timeout", "'00:30' must be a positive TimeSpan up to one day, as hh:mm:ss")]
    [InlineData("Timeout", "1.00:00", "Nbd:Mappings:1:Timeout", "as hh:mm:ss")]
    [InlineData("Timeout", "00:00:02.5", "Nbd:Mappings:1:Timeout", "'00:00:02.5' must be whole seconds: the nbd driver takes this timeout in seconds")]
    [InlineData("Connections", "0", "Nbd:Mappings:1:Connections", "from 1 to 16")]
    [InlineData("Connections", "17", "Nbd:Mappings:1:Connections", "from 1 to 16")]
    [InlineData("ReadOnly", "yes", "Nbd:Mappings:1:ReadOnly", "true or false")]
    [InlineData("DeadConnectionTimeout", "00:01:00", "Nbd:Mappings:1:DeadConnectionTimeout", "only valid with Interface=Netlink")]
    [InlineData("Reconnect:InitialDelay", "soon", "Nbd:Mappings:1:Reconnect:InitialDelay", "positive TimeSpan")]
    [InlineData("Reconnect:MaxDelay", "00:00:00.5", "Nbd:Mappings:1:Reconnect:MaxDelay", "smaller than InitialDelay")]
    [InlineData("Reconnect:MaxAttempts", "-1", "Nbd:Mappings:1:Reconnect:MaxAttempts", "at least 0")]
    [InlineData("Reconnect:Enabled", "on", "Nbd:Mappings:1:Reconnect:Enabled", "true or false")]
    [InlineData("Timout", "00:00:10", "Nbd:Mappings:1:Timout", "unknown key")]
    [InlineData("Name", "has space", "Nbd:Mappings:1:Name", "must be 1-64 characters")]
    [InlineData("Device", "/dev/nbd01", "Nbd:Mappings:1:Device", "must be /dev/nbdN")] // no such node; /dev/nbd1 twice
    [InlineData("Timeout", "1", "Nbd:Mappings:1:Timeout", "positive TimeSpan")]       // TimeSpan.Parse: one day
    [InlineData("Reconnect:MaxDelay", "1", "Nbd:Mappings:1:Reconnect:MaxDelay", "positive TimeSpan")]
    [InlineData("Reconnect", "false", "Nbd:Mappings:1:Reconnect", "must be a section (Enabled, InitialDelay, MaxDelay, MaxAttempts)")]
    public void Read_BadValueInSecondMapping_ErrorNamesFullKey(string key, string value, string expectedKey, string expectedReason)
    {
        var values = new Dictionary<string, string>
        {
            ["Nbd:Mappings:0:Name"] = "root", ["Nbd:Mappings:0:Uri"] = "nbd://localhost/root",
            ["Nbd:Mappings:1:Name"] = "data", ["Nbd:Mappings:1:Uri"] = "nbd://localhost/data",
        };
        values["Nbd:Mappings:1:" + key] = value;

        ConfigurationError error = SingleError([.. values.Select(kv => (kv.Key, kv.Value))]);

        Assert.Equal(expectedKey, error.Key);
        Assert.Contains(expectedReason, error.Reason, StringComparison.Ordinal);
    }

    [Fact]
    public void Read_MissingNameAndUri_BothReported()
    {
        var ex = Assert.Throws<NbdConfigurationException>(() => Read(("Nbd:Mappings:0:ReadOnly", "true")));
        Assert.Equal(["Nbd:Mappings:0:Name", "Nbd:Mappings:0:Uri"], ex.Errors.Select(e => e.Key));
        Assert.All(ex.Errors, e => Assert.Equal("is required", e.Reason));
    }

    [Fact]
    public void Read_DuplicateNameCaseInsensitive_NamesSecondKey()
    {
        ConfigurationError e = SingleError(
            ("Nbd:Mappings:0:Name", "data"), ("Nbd:Mappings:0:Uri", "nbd://a/x"),
            ("Nbd:Mappings:1:Name", "DATA"), ("Nbd:Mappings:1:Uri", "nbd://b/y"));
        Assert.Equal("Nbd:Mappings:1:Name", e.Key);
        Assert.Equal("duplicate mapping name 'DATA' (also Nbd:Mappings:0:Name)", e.Reason);
    }

    [Fact]
    public void Read_DuplicateDevice_NamesSecondKey()
    {
        ConfigurationError e = SingleError(
            ("Nbd:Mappings:0:Name", "a"), ("Nbd:Mappings:0:Uri", "nbd://a/x"), ("Nbd:Mappings:0:Device", "/dev/nbd1"),
            ("Nbd:Mappings:1:Name", "b"), ("Nbd:Mappings:1:Uri", "nbd://b/y"), ("Nbd:Mappings:1:Device", "/dev/nbd1"));
        Assert.Equal("Nbd:Mappings:1:Device", e.Key);
        Assert.Equal("device /dev/nbd1 is already used by Nbd:Mappings:0", e.Reason);
    }

    [Fact]
    public void Read_DuplicateNameOrDeviceWithSpaces_NamesSecondKey()
    {
        // Values are used trimmed, so the duplicate check compares them trimmed: "data " is the backend "nbd-daemon:data".
        var ex = Assert.Throws<NbdConfigurationException>(() => Read(
            ("Nbd:Mappings:0:Name", "data"), ("Nbd:Mappings:0:Uri", "nbd://a/x"), ("Nbd:Mappings:0:Device", "/dev/nbd1"),
            ("Nbd:Mappings:1:Name", "data "), ("Nbd:Mappings:1:Uri", "nbd://b/y"), ("Nbd:Mappings:1:Device", " /dev/nbd1")));
        Assert.Equal(["Nbd:Mappings:1:Name", "Nbd:Mappings:1:Device"], ex.Errors.Select(e => e.Key));
    }

    [Theory]
    [InlineData("Nbd:Mapping:0:Name", "Nbd:Mapping")]
    [InlineData("Nbd:Timeout", "Nbd:Timeout")]
    public void Read_UnknownKeyInSection_NamesIt(string key, string expectedKey)
    {
        // A typo in the list's own name would otherwise start a daemon with no mappings and no word about it.
        ConfigurationError e = SingleError((key, "x"));
        Assert.Equal(expectedKey, e.Key);
        Assert.Contains("unknown key", e.Reason, StringComparison.Ordinal);
    }

    [Fact]
    public void Read_MappingsNotAList_Error()
    {
        ConfigurationError e = SingleError(("Nbd:Mappings:first:Name", "a"));
        Assert.Equal("Nbd:Mappings:first", e.Key);
    }

    [Fact]
    public void Read_JsonFile_SameRulesAsOtherSources()
    {
        string path = Path.Combine(Path.GetTempPath(), $"nbd-cfg-{Guid.NewGuid():N}.json");
        File.WriteAllText(path, """{ "Nbd": { "Mappings": [ { "Name": "a", "Uri": "nbd://h/e", "Timeout": "00:00:05" }, { "Name": "b", "Uri": "nbd://[::1]:1234/x", "Connections": 20 } ] } }""");
        try
        {
            IConfigurationRoot config = new ConfigurationBuilder().AddJsonFile(path).Build();
            var ex = Assert.Throws<NbdConfigurationException>(() => new NbdConfigurationReader(new ProtocolUriParser()).Read(config));
            Assert.Equal("Nbd:Mappings:1:Connections", Assert.Single(ex.Errors).Key);
        }
        finally
        {
            File.Delete(path);
        }
    }
}

public sealed class ProtocolUriParserTests
{
    [Theory]
    [InlineData("nbd://localhost", "localhost:10809", "")]
    [InlineData("nbd://localhost:10810/", "localhost:10810", "")]
    [InlineData("nbd://10.0.0.1/disk%20one", "10.0.0.1:10809", "disk one")]
    [InlineData("nbd://[::1]:7000/a/b", "[::1]:7000", "a/b")]
    [InlineData("nbd+unix:///exp?socket=/tmp/s.sock", "unix:/tmp/s.sock", "exp")]
    [InlineData("NBD+UNIX:///?socket=%2Frun%2Fx", "unix:/run/x", "")]
    public void Parse_ValidUris_ServerAndExport(string uri, string server, string export) =>
        Assert.Equal(new MappingEndpoint(server, export), new ProtocolUriParser().Parse(uri));

    [Theory]
    [InlineData("localhost:10809")]
    [InlineData("nbd://")]
    [InlineData("nbd://:10809/x")]
    [InlineData("nbd://host:0/x")]
    [InlineData("nbd://[::1/x")]
    [InlineData("nbd+unix://host/x?socket=/s")]
    [InlineData("nbd+vsock://1/x")]
    public void Parse_InvalidUris_FormatException(string uri) =>
        Assert.ThrowsAny<FormatException>(() => new ProtocolUriParser().Parse(uri));

    /// <summary>
    /// A TLS URI passed the configuration and the unit started "successfully", with the mapping Failed for good at its
    /// first attempt: this version has no TLS, so no such mapping can ever connect.
    /// </summary>
    [Theory]
    [InlineData("nbds://10.0.0.1/disk")]
    [InlineData("NBDS+UNIX:///?socket=%2Frun%2Fx")]
    public void Read_TlsUri_RefusedSayingWhy(string uri)
    {
        IConfiguration config = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Nbd:Mappings:0:Name"] = "secure",
            ["Nbd:Mappings:0:Uri"] = uri,
        }).Build();

        var ex = Assert.Throws<NbdConfigurationException>(() => new NbdConfigurationReader(new ProtocolUriParser()).Read(config));

        ConfigurationError error = Assert.Single(ex.Errors);
        Assert.Equal("Nbd:Mappings:0:Uri", error.Key);
        Assert.Equal($"'{uri}': it asks for TLS (nbds), which this version does not implement, so the mapping could never connect; only a server that also allows plaintext can be mapped, with nbd://", error.Reason);
    }
}

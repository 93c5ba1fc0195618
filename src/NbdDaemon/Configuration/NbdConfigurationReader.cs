using System.Globalization;
using System.Text.RegularExpressions;
using Nbd.Kernel;
using NbdDaemon.Mappings;

namespace NbdDaemon.Configuration;

/// <summary>
/// Reads section <c>Nbd</c> from raw strings and validates every value, so each error names its full key.
/// The binder is deliberately not used: it ignores unknown keys and reports bad values without the key.
/// </summary>
internal sealed partial class NbdConfigurationReader
{
    public const string SectionName = "Nbd";

    private static readonly HashSet<string> s_mappingKeys = new(StringComparer.OrdinalIgnoreCase)
    {
        "Name", "Uri", "Device", "Interface", "BlockSize", "Timeout", "DeadConnectionTimeout", "Connections", "ReadOnly",
        "Reconnect", "OnStop", "KeepAlive", "Relay",
    };

    private static readonly HashSet<string> s_reconnectKeys = new(StringComparer.OrdinalIgnoreCase)
    {
        "Enabled", "InitialDelay", "MaxDelay", "MaxAttempts",
    };

    private readonly INbdUriParser _uriParser;

    public NbdConfigurationReader(INbdUriParser uriParser)
    {
        _uriParser = uriParser;
    }

    /// <summary>Validates everything, then either returns all mappings or throws with every error found.</summary>
    /// <exception cref="NbdConfigurationException">At least one value is invalid.</exception>
    public IReadOnlyList<MappingOptions> Read(IConfiguration configuration)
    {
        var errors = new List<ConfigurationError>();
        var mappings = new List<MappingOptions>();
        // A value of "Nbd" itself is not refused: environment variables are read without a prefix, so one named NBD
        // (or nbd) on the host would keep the daemon from starting.
        IConfigurationSection root = configuration.GetSection(SectionName);
        foreach (IConfigurationSection child in root.GetChildren())
        {
            if (!string.Equals(child.Key, "Mappings", StringComparison.OrdinalIgnoreCase))
            {
                // "Nbd:Mapping" (a typo) would otherwise leave the daemon running with no mappings at all.
                errors.Add(new ConfigurationError(child.Path, "unknown key (the section has only Mappings)"));
            }
        }

        IConfigurationSection list = configuration.GetSection(SectionName + ":Mappings");
        if (list.Value is { Length: > 0 })
        {
            errors.Add(new ConfigurationError(list.Path, "must be a list of mappings, not a single value"));
        }

        foreach (IConfigurationSection entry in list.GetChildren())
        {
            if (!int.TryParse(entry.Key, NumberStyles.None, CultureInfo.InvariantCulture, out _))
            {
                errors.Add(new ConfigurationError(entry.Path, "Mappings must be a list (JSON array, or keys 0, 1, …)"));
                continue;
            }

            MappingOptions? mapping = ReadMapping(entry, errors);
            if (mapping is not null)
            {
                mappings.Add(mapping);
            }
        }

        CheckUnique(list, errors);
        if (errors.Count > 0)
        {
            throw new NbdConfigurationException(errors);
        }

        return mappings;
    }

    private MappingOptions? ReadMapping(IConfigurationSection entry, List<ConfigurationError> errors)
    {
        int before = errors.Count;
        foreach (IConfigurationSection child in entry.GetChildren())
        {
            if (!s_mappingKeys.Contains(child.Key))
            {
                errors.Add(new ConfigurationError(child.Path, "unknown key (a typo here would otherwise be silently ignored)"));
            }
            else if (!string.Equals(child.Key, "Reconnect", StringComparison.OrdinalIgnoreCase))
            {
                CheckSingleValue(child, errors);
            }
        }

        string? name = Required(entry, "Name", errors);
        if (name is not null && !NamePattern().IsMatch(name))
        {
            errors.Add(new ConfigurationError(Key(entry, "Name"), $"'{name}' must be 1-64 characters of A-Z a-z 0-9 . _ -"));
        }

        string? uri = Required(entry, "Uri", errors);
        MappingEndpoint? endpoint = null;
        if (uri is not null)
        {
            try
            {
                endpoint = _uriParser.Parse(uri);
            }
            catch (FormatException ex)
            {
                errors.Add(new ConfigurationError(Key(entry, "Uri"), $"'{uri}' is not a valid NBD URI: {ex.Message}"));
            }
            catch (NotSupportedException ex)
            {
                // Refused here rather than by a unit that starts "successfully" with a mapping Failed for good.
                errors.Add(new ConfigurationError(Key(entry, "Uri"), $"'{uri}': {ex.Message}"));
            }
        }

        string? device = Optional(entry, "Device");
        if (device is not null && !NbdKernel.TryParseDevicePath(device, out _))
        {
            errors.Add(new ConfigurationError(Key(entry, "Device"), $"'{device}' must be /dev/nbdN (N of up to {NbdKernel.MaxIndexDigits} digits, no leading zero)"));
        }

        KernelInterface kernelInterface = KernelInterface.Ioctl;
        string? interfaceText = Optional(entry, "Interface");
        if (interfaceText is not null && !TryParseInterface(interfaceText, out kernelInterface))
        {
            errors.Add(new ConfigurationError(Key(entry, "Interface"), $"unknown interface '{interfaceText}' (Ioctl or Netlink)"));
        }

        uint? blockSize = null;
        string? blockSizeText = Optional(entry, "BlockSize");
        if (blockSizeText is not null)
        {
            if (uint.TryParse(blockSizeText, NumberStyles.None, CultureInfo.InvariantCulture, out uint bs)
                && BlockSizePolicy.IsValid(bs))
            {
                blockSize = bs;
            }
            else
            {
                errors.Add(new ConfigurationError(Key(entry, "BlockSize"), $"'{blockSizeText}' must be a power of two from 512 to 4096"));
            }
        }

        bool netlink = kernelInterface == KernelInterface.Netlink;
        TimeSpan defaultTimeout = netlink ? MappingOptions.DefaultNetlinkTimeout : MappingOptions.DefaultTimeout;
        TimeSpan timeout;
        if (netlink && IsZero(Optional(entry, "Timeout")))
        {
            // In-flight requests on a connection that died are only resent when their request timeout fires;
            // without one they would wait forever, however quickly the daemon reconnects.
            errors.Add(new ConfigurationError(Key(entry, "Timeout"), "must be greater than zero with Interface=Netlink: requests in flight when a connection dies are only resent when their timeout fires"));
            timeout = defaultTimeout;
        }
        else
        {
            timeout = ReadTimeSpan(entry, "Timeout", defaultTimeout, errors, wholeSeconds: true);
        }

        TimeSpan? deadTimeout = netlink ? MappingOptions.DefaultDeadConnectionTimeout : null;
        string? deadText = Optional(entry, "DeadConnectionTimeout");
        if (deadText is not null)
        {
            if (!netlink)
            {
                errors.Add(new ConfigurationError(Key(entry, "DeadConnectionTimeout"), "only valid with Interface=Netlink"));
            }
            else if (IsZero(deadText))
            {
                errors.Add(new ConfigurationError(Key(entry, "DeadConnectionTimeout"), "must be greater than zero: with 0 the kernel fails I/O at once when the connection dies instead of holding it for the reconnect"));
            }
            else
            {
                deadTimeout = ReadTimeSpan(entry, "DeadConnectionTimeout", MappingOptions.DefaultDeadConnectionTimeout, errors, wholeSeconds: true);
            }
        }

        StopAction onStop = StopAction.Disconnect;
        string? onStopText = Optional(entry, "OnStop");
        if (onStopText is not null)
        {
            if (string.Equals(onStopText, nameof(StopAction.Disconnect), StringComparison.OrdinalIgnoreCase))
            {
                onStop = StopAction.Disconnect;
            }
            else if (string.Equals(onStopText, nameof(StopAction.Leave), StringComparison.OrdinalIgnoreCase))
            {
                onStop = StopAction.Leave;
                if (!netlink)
                {
                    errors.Add(new ConfigurationError(Key(entry, "OnStop"), "Leave needs Interface=Netlink: an ioctl device lives only as long as the daemon's thread in NBD_DO_IT"));
                }
            }
            else
            {
                errors.Add(new ConfigurationError(Key(entry, "OnStop"), $"unknown value '{onStopText}' (Disconnect or Leave)"));
            }
        }

        TimeSpan keepAlive = MappingOptions.DefaultKeepAlive;
        string? keepAliveText = Optional(entry, "KeepAlive");
        if (IsZero(keepAliveText))
        {
            keepAlive = TimeSpan.Zero;
        }
        else if (keepAliveText is not null)
        {
            keepAlive = ReadTimeSpan(entry, "KeepAlive", MappingOptions.DefaultKeepAlive, errors);
            if (keepAlive < MappingOptions.MinimumKeepAlive)
            {
                errors.Add(new ConfigurationError(Key(entry, "KeepAlive"), $"'{keepAliveText}' must be 0 (off) or at least 00:00:03: keepalive probes are counted in whole seconds"));
            }
            else if (keepAlive > MappingOptions.MaximumKeepAlive)
            {
                errors.Add(new ConfigurationError(Key(entry, "KeepAlive"), $"'{keepAliveText}' is more than 18:12:15: the first probe comes after half of it, and Linux takes at most 32767 s there (TCP_KEEPIDLE)"));
            }
        }

        int connections = ReadInt(entry, "Connections", 1, 1, MappingOptions.MaxConnections, errors);
        bool readOnly = ReadBool(entry, "ReadOnly", false, errors);
        bool relay = ReadBool(entry, "Relay", false, errors);

        IConfigurationSection reconnectSection = entry.GetSection("Reconnect");
        if (reconnectSection.Value is { Length: > 0 } reconnectText)
        {
            // "Reconnect": false has no children: the defaults (retry forever) would apply without a word.
            errors.Add(new ConfigurationError(reconnectSection.Path, $"'{reconnectText}' must be a section (Enabled, InitialDelay, MaxDelay, MaxAttempts), e.g. Reconnect:Enabled=false"));
        }

        foreach (IConfigurationSection child in reconnectSection.GetChildren())
        {
            if (!s_reconnectKeys.Contains(child.Key))
            {
                errors.Add(new ConfigurationError(child.Path, "unknown key"));
            }
            else
            {
                CheckSingleValue(child, errors);
            }
        }

        ReconnectOptions d = ReconnectOptions.Default;
        var reconnect = new ReconnectOptions(
            ReadBool(reconnectSection, "Enabled", d.Enabled, errors),
            ReadTimeSpan(reconnectSection, "InitialDelay", d.InitialDelay, errors),
            ReadTimeSpan(reconnectSection, "MaxDelay", d.MaxDelay, errors),
            ReadInt(reconnectSection, "MaxAttempts", d.MaxAttempts, 0, int.MaxValue, errors));
        if (reconnect.MaxDelay < reconnect.InitialDelay)
        {
            errors.Add(new ConfigurationError(Key(reconnectSection, "MaxDelay"), $"{reconnect.MaxDelay} is smaller than InitialDelay {reconnect.InitialDelay}"));
        }

        if (errors.Count != before || name is null || uri is null || endpoint is null)
        {
            return null;
        }

        return new MappingOptions
        {
            Name = name,
            Uri = uri,
            Endpoint = endpoint,
            Device = device,
            Interface = kernelInterface,
            BlockSize = blockSize,
            Timeout = timeout,
            DeadConnectionTimeout = deadTimeout,
            Connections = connections,
            ReadOnly = readOnly,
            Reconnect = reconnect,
            OnStop = onStop,
            KeepAlive = keepAlive,
            Relay = relay,
        };
    }

    private static void CheckUnique(IConfigurationSection list, List<ConfigurationError> errors)
    {
        // Keys are re-derived from the list so the message points at the second occurrence.
        var names = new Dictionary<string, string>(StringComparer.OrdinalIgnoreCase);
        var devices = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (IConfigurationSection entry in list.GetChildren())
        {
            // The values as they are used: trimmed, like every value read.
            string? name = Optional(entry, "Name");
            if (name is not null && !names.TryAdd(name, entry.Path))
            {
                errors.Add(new ConfigurationError(Key(entry, "Name"), $"duplicate mapping name '{name}' (also {names[name]}:Name)"));
            }

            string? device = Optional(entry, "Device");
            if (device is not null && !devices.TryAdd(device, entry.Path))
            {
                errors.Add(new ConfigurationError(Key(entry, "Device"), $"device {device} is already used by {devices[device]}"));
            }
        }
    }

    private static bool TryParseInterface(string text, out KernelInterface value)
    {
        // Enum.TryParse would also accept "0", "1" and "Ioctl,Netlink"; only the names are meant.
        if (string.Equals(text, nameof(KernelInterface.Ioctl), StringComparison.OrdinalIgnoreCase))
        {
            value = KernelInterface.Ioctl;
            return true;
        }

        if (string.Equals(text, nameof(KernelInterface.Netlink), StringComparison.OrdinalIgnoreCase))
        {
            value = KernelInterface.Netlink;
            return true;
        }

        value = default;
        return false;
    }

    private static bool IsZero(string? text) =>
        text is not null && TimeSpan.TryParse(text, CultureInfo.InvariantCulture, out TimeSpan value) && value == TimeSpan.Zero;

    private static string Key(IConfigurationSection section, string key) => section.Path + ":" + key;

    /// <summary>
    /// A setting given as a JSON object or list (<c>"Device": ["/dev/nbd0"]</c>, <c>Timeout:Seconds=5</c>) has no value
    /// of its own, only children: read as absent, its default would apply without a word (any free device, read-write).
    /// JSON null and an empty object (<c>"ReadOnly": {}</c>) have neither: the JSON provider keeps the key with a null
    /// value (an empty variable or <c>--Key=</c> give "", which means "not set"), and the default applied just the same.
    /// (An empty list leaves no key at all: that one cannot be told from an absent key.)
    /// </summary>
    private static void CheckSingleValue(IConfigurationSection setting, List<ConfigurationError> errors)
    {
        if (setting.Value is null && !setting.GetChildren().Any())
        {
            errors.Add(new ConfigurationError(setting.Path, "has no value (JSON null or an empty object): leave the key out for its default"));
        }
        else if (setting.GetChildren().Any())
        {
            errors.Add(new ConfigurationError(setting.Path, "must be a single value, not an object or a list"));
        }
    }

    private static string? Optional(IConfigurationSection section, string key)
    {
        string? value = section[key];
        return string.IsNullOrWhiteSpace(value) ? null : value.Trim();
    }

    private static string? Required(IConfigurationSection section, string key, List<ConfigurationError> errors)
    {
        string? value = Optional(section, key);
        if (value is null)
        {
            errors.Add(new ConfigurationError(Key(section, key), "is required"));
        }

        return value;
    }

    /// <summary>
    /// A positive TimeSpan up to a day. With <paramref name="wholeSeconds"/>, a value the nbd driver takes in whole seconds
    /// (NBD_SET_TIMEOUT, NBD_ATTR_TIMEOUT, NBD_ATTR_DEAD_CONN_TIMEOUT): a fraction is refused here, not by the kernel layer
    /// on every connect attempt.
    /// </summary>
    private static TimeSpan ReadTimeSpan(IConfigurationSection section, string key, TimeSpan fallback, List<ConfigurationError> errors, bool wholeSeconds = false)
    {
        string? text = Optional(section, key);
        if (text is null)
        {
            return fallback;
        }

        // A bare number would parse as days ("1" is a day), and hours:minutes as just that ("00:30" is half an hour, where
        // 30 seconds was likely meant): the format needs all three parts, hh:mm:ss.
        if (text.Count(c => c == ':') < 2
            || !TimeSpan.TryParse(text, CultureInfo.InvariantCulture, out TimeSpan value) || value <= TimeSpan.Zero
            || value > TimeSpan.FromDays(1))
        {
            errors.Add(new ConfigurationError(Key(section, key), $"'{text}' must be a positive TimeSpan up to one day, as hh:mm:ss, e.g. 00:00:30"));
            return fallback;
        }

        if (wholeSeconds && value.Ticks % TimeSpan.TicksPerSecond != 0)
        {
            errors.Add(new ConfigurationError(Key(section, key), $"'{text}' must be whole seconds: the nbd driver takes this timeout in seconds"));
            return fallback;
        }

        return value;
    }

    private static int ReadInt(IConfigurationSection section, string key, int fallback, int min, int max, List<ConfigurationError> errors)
    {
        string? text = Optional(section, key);
        if (text is null)
        {
            return fallback;
        }

        if (!int.TryParse(text, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out int value) || value < min || value > max)
        {
            string range = max == int.MaxValue ? $"at least {min}" : $"from {min} to {max}";
            errors.Add(new ConfigurationError(Key(section, key), $"'{text}' must be an integer {range}"));
            return fallback;
        }

        return value;
    }

    private static bool ReadBool(IConfigurationSection section, string key, bool fallback, List<ConfigurationError> errors)
    {
        string? text = Optional(section, key);
        if (text is null)
        {
            return fallback;
        }

        if (!bool.TryParse(text, out bool value))
        {
            errors.Add(new ConfigurationError(Key(section, key), $"'{text}' must be true or false"));
            return fallback;
        }

        return value;
    }

    [GeneratedRegex("^[A-Za-z0-9._-]{1,64}$")]
    private static partial Regex NamePattern();

}

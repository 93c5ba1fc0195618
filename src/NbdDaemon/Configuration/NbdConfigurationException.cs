namespace NbdDaemon.Configuration;

/// <summary>One invalid configuration value: the full key (e.g. <c>Nbd:Mappings:1:Uri</c>) and why.</summary>
internal sealed record ConfigurationError(string Key, string Reason)
{
    public override string ToString() => $"{Key}: {Reason}";
}

/// <summary>The configuration is unusable; the process exits with EX_CONFIG (78) before touching a device.</summary>
internal sealed class NbdConfigurationException : Exception
{
    public NbdConfigurationException(IReadOnlyList<ConfigurationError> errors)
        : base("Invalid configuration: " + string.Join("; ", errors))
    {
        Errors = errors;
    }

    public NbdConfigurationException(string message, Exception inner)
        : base(message, inner)
    {
        Errors = [new ConfigurationError("(configuration files)", message)];
    }

    public IReadOnlyList<ConfigurationError> Errors { get; }
}

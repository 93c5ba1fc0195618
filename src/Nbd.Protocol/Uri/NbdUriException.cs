namespace Nbd.Protocol;

/// <summary>An NBD URI (doc/uri.md) that cannot be used; <see cref="Exception.Message"/> says why.</summary>
public sealed class NbdUriException : FormatException
{
    public NbdUriException(string uriText, string reason)
        : base($"Invalid NBD URI '{uriText}': {reason}")
    {
        UriText = uriText;
        Reason = reason;
    }

    public string UriText { get; }

    /// <summary>The reason alone, without the URI.</summary>
    public string Reason { get; }
}

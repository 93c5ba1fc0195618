namespace Nbd.Protocol;

/// <summary>Timeouts and limits of one client connection. Defaults suit a daemon that retries.</summary>
public sealed class NbdClientOptions
{
    /// <summary>Bound on establishing the TCP or unix-socket connection (per attempt over all resolved addresses).</summary>
    public TimeSpan ConnectTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>Bound on the whole handshake, from the first byte read until transmission can start.</summary>
    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>Upper bound on NBD_REP_SERVER replies accepted from one NBD_OPT_LIST.</summary>
    public int MaxListEntries { get; init; } = 100_000;

    /// <summary>Clock for the timeouts; replaced by a fake in tests.</summary>
    public TimeProvider TimeProvider { get; init; } = TimeProvider.System;

    internal static NbdClientOptions Default { get; } = new();
}

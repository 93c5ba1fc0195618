namespace Nbd.Protocol;

/// <summary>Constants of the NBD wire protocol (doc/proto.md of NetworkBlockDevice/nbd).</summary>
public static class NbdProtocol
{
    /// <summary>The IANA-assigned NBD port.</summary>
    public const int DefaultPort = 10809;
}

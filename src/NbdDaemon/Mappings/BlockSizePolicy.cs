using System.Numerics;

namespace NbdDaemon.Mappings;

/// <summary>
/// The block sizes we give the kernel, one rule for the configuration, the daemon and the <c>connect</c> verb: a power
/// of two from 512 to 4096 (every page size the driver runs on allows these), defaulting to the server's preferred
/// size when it is one of them, else 4096.
/// </summary>
internal static class BlockSizePolicy
{
    public const uint Minimum = 512;
    public const uint Maximum = 4096;
    public const uint Default = 4096;

    public static bool IsValid(uint blockSize) => blockSize is >= Minimum and <= Maximum && BitOperations.IsPow2(blockSize);

    /// <summary>The configured size if any, else the server's preferred size if valid, else <see cref="Default"/>.</summary>
    public static uint Choose(uint? configured, uint? serverPreferred) =>
        configured ?? (serverPreferred is uint preferred && IsValid(preferred) ? preferred : Default);
}

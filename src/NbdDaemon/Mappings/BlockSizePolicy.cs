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

    /// <summary>
    /// Why <paramref name="chosen"/> (from <see cref="Choose"/>) cannot serve an export whose server takes blocks of
    /// <paramref name="serverMinimum"/> to <paramref name="serverMaximum"/> bytes, worded for whoever can fix it: the
    /// setting (<paramref name="setting"/>) when the user chose the size, the server when no size the kernel takes
    /// fits; null when it fits.
    /// </summary>
    public static string? Conflict(uint? configured, uint chosen, uint? serverMinimum, uint? serverMaximum, string setting)
    {
        if (serverMinimum is uint minimum && minimum > chosen)
        {
            return configured is null || minimum > Maximum
                ? $"the server's minimum block size {minimum} is above {Maximum}, the largest nbd-daemon gives the kernel (the page size, the most every kernel's nbd driver takes): this export cannot be mapped"
                : $"the server's minimum block size {minimum} is above {setting} {chosen}: set {setting} to {minimum}";
        }

        if (serverMaximum is uint maximum && maximum < chosen)
        {
            // The spec has the maximum at least the preferred size, and the preferred at least 512: only a chosen size
            // above both gets here.
            return $"the server takes at most {maximum} bytes per request, less than one block of {chosen}: set {setting} to {Math.Max(Minimum, BitOperations.RoundUpToPowerOf2(maximum + 1) / 2)} or less";
        }

        return null;
    }

    /// <summary>The configured size if any, else the server's preferred size if valid, else <see cref="Default"/>.</summary>
    public static uint Choose(uint? configured, uint? serverPreferred) =>
        configured ?? (serverPreferred is uint preferred && IsValid(preferred) ? preferred : Default);
}

using NbdDaemon.Configuration;

namespace NbdDaemon.Mappings;

/// <summary>
/// Capped exponential backoff with jitter: attempt n (1-based) waits
/// <c>base = min(MaxDelay, InitialDelay · 2^(n-1))</c> scaled by a factor in [0.5, 1.0).
/// The jitter keeps mappings (and other clients of a restarted server) from reconnecting in lock step;
/// the lower bound of half the base keeps a flapping server from being hammered.
/// </summary>
internal sealed class ReconnectBackoff
{
    private readonly ReconnectOptions _options;
    private readonly Func<double> _unitRandom;

    /// <param name="options">The mapping's reconnect policy.</param>
    /// <param name="unitRandom">Source of numbers in [0, 1); injected so tests are deterministic.</param>
    public ReconnectBackoff(ReconnectOptions options, Func<double>? unitRandom = null)
    {
        _options = options;
        _unitRandom = unitRandom ?? Random.Shared.NextDouble;
    }

    /// <summary>The cap before jitter for the given consecutive failed attempt (1-based).</summary>
    public TimeSpan BaseDelay(int attempt)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(attempt, 1);
        // Doubling past 2^30 cannot stay under any sensible MaxDelay; stop before TimeSpan overflows.
        int exponent = Math.Min(attempt - 1, 30);
        double ticks = _options.InitialDelay.Ticks * Math.Pow(2, exponent);
        return ticks >= _options.MaxDelay.Ticks ? _options.MaxDelay : TimeSpan.FromTicks((long)ticks);
    }

    public TimeSpan NextDelay(int attempt)
    {
        double u = Math.Clamp(_unitRandom(), 0.0, 1.0);
        return TimeSpan.FromTicks((long)(BaseDelay(attempt).Ticks * (0.5 + (0.5 * u))));
    }
}

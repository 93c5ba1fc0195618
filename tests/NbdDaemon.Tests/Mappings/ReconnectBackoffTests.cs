using FsCheck;
using FsCheck.Fluent;
using NbdDaemon.Configuration;
using NbdDaemon.Mappings;

namespace NbdDaemon.Tests.Mappings;

public sealed class ReconnectBackoffTests
{
    private static readonly ReconnectOptions Options = new(true, TimeSpan.FromSeconds(1), TimeSpan.FromMinutes(1), 0);

    [Fact]
    public void BaseDelay_Attempts_DoubleFromInitialAndCapAtMax()
    {
        var backoff = new ReconnectBackoff(Options);
        double[] seconds = [.. Enumerable.Range(1, 10).Select(n => backoff.BaseDelay(n).TotalSeconds)];
        Assert.Equal([1, 2, 4, 8, 16, 32, 60, 60, 60, 60], seconds);
    }

    [Fact]
    public void BaseDelay_HugeAttemptNumber_NoOverflow() =>
        Assert.Equal(TimeSpan.FromMinutes(1), new ReconnectBackoff(Options).BaseDelay(int.MaxValue));

    [Theory]
    [InlineData(0.0, 2.0)]
    [InlineData(0.5, 3.0)]
    [InlineData(0.999, 3.998)]
    public void NextDelay_Jitter_ScalesThirdAttemptBetweenHalfAndFull(double random, double expectedSeconds) =>
        Assert.Equal(expectedSeconds, new ReconnectBackoff(Options, () => random).NextDelay(3).TotalSeconds, 3);

    [Fact]
    public void NextDelay_AnyRandomAndAttempt_WithinHalfBaseAndMax() =>
        Prop.ForAll(
            Gen.Choose(1, 1000).ToArbitrary(),
            Gen.Choose(0, 1_000_000).ToArbitrary(),
            (attempt, r) =>
            {
                var backoff = new ReconnectBackoff(Options, () => r / 1_000_001.0);
                TimeSpan baseDelay = backoff.BaseDelay(attempt);
                TimeSpan delay = backoff.NextDelay(attempt);
                return delay >= baseDelay / 2 && delay <= baseDelay && delay <= Options.MaxDelay;
            }).QuickCheckThrowOnFailure();

    [Fact]
    public void NextDelay_SystemRandom_SpreadsValues()
    {
        var backoff = new ReconnectBackoff(Options);
        var delays = Enumerable.Range(0, 50).Select(_ => backoff.NextDelay(5)).ToHashSet();
        Assert.True(delays.Count > 10, "jitter should vary the delay");
        Assert.All(delays, d => Assert.InRange(d, TimeSpan.FromSeconds(8), TimeSpan.FromSeconds(16)));
    }
}

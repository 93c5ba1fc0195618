using System.Diagnostics;
using Microsoft.Extensions.Time.Testing;
using Nbd.Protocol.Tests.TestSupport;

namespace Nbd.Protocol.Tests.Handshake;

public sealed class HandshakeTimeoutTests
{
    private static readonly NbdUri Disk = NbdUri.Parse("nbd://server.test/disk");

    public static TheoryData<string, byte[], string, bool> SilentAfter() => new()
    {
        { "nothing", [], "the server greeting (NBDMAGIC + magic)", true },
        { "half a greeting", ServerScript.Newstyle(3).ToArray()[..10], "the server greeting (NBDMAGIC + magic)", false },
        { "greeting", ServerScript.Newstyle(3).ToArray(), "the reply header to NBD_OPT_GO", false },
        { "one INFO", ServerScript.Newstyle(3).InfoExport(NbdOption.Go, 1, TransmissionFlags.HasFlags).ToArray(), "the reply header to NBD_OPT_GO", false },
    };

    [Theory]
    [MemberData(nameof(SilentAfter))]
    public async Task Go_ServerFallsSilent_TimeoutAfterHandshakeTimeout(string because, byte[] prefix, string awaiting, bool noGreeting)
    {
        var options = new NbdClientOptions { HandshakeTimeout = TimeSpan.FromMilliseconds(300) };
        var watch = Stopwatch.StartNew();

        var ex = await Assert.ThrowsAsync<NbdTimeoutException>(() => NbdClient.NegotiateAsync(new SilentStream(prefix), Disk, options, CancellationToken.None));

        Assert.Equal(NbdTimeoutPhase.Handshake, ex.Phase);
        Assert.Equal(TimeSpan.FromMilliseconds(300), ex.Timeout);
        Assert.True(watch.Elapsed >= TimeSpan.FromMilliseconds(250), because);
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(5), because);
        Assert.Equal("server.test:10809", ex.Server);

        // What it waited for: a server that sent nothing at all is no NBD server (or a stuck one), one that stopped
        // later is another problem.
        Assert.Equal(awaiting, ex.Awaiting);
        Assert.Equal(noGreeting, ex.NoGreeting);
        Assert.Contains($"timed out after 300 ms waiting for {awaiting}.", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Go_FakeClock_TimesOutExactlyWhenTimeAdvances()
    {
        var clock = new FakeTimeProvider();
        var options = new NbdClientOptions { HandshakeTimeout = TimeSpan.FromSeconds(10), TimeProvider = clock };

        var task = NbdClient.NegotiateAsync(new SilentStream([]), Disk, options, CancellationToken.None);
        clock.Advance(TimeSpan.FromSeconds(9.9));
        await Task.Delay(50);
        Assert.False(task.IsCompleted);

        clock.Advance(TimeSpan.FromSeconds(0.2));
        var ex = await Assert.ThrowsAsync<NbdTimeoutException>(() => task.WaitAsync(TimeSpan.FromSeconds(5)));
        Assert.Equal(NbdTimeoutPhase.Handshake, ex.Phase);
    }

    [Fact]
    public async Task Go_CallerCancels_OperationCanceledNotTimeout()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(100));

        var ex = await Assert.ThrowsAnyAsync<OperationCanceledException>(() =>
            NbdClient.NegotiateAsync(new SilentStream([]), Disk, new NbdClientOptions(), cts.Token));

        Assert.IsNotType<NbdTimeoutException>(ex);

        // What it waited for goes with the cancellation: the caller's deadline (a daemon's attempt Timeout) names it.
        var canceled = Assert.IsType<NbdHandshakeCanceledException>(ex);
        Assert.True(canceled.NoGreeting);
        Assert.Equal("the server greeting (NBDMAGIC + magic)", canceled.Awaiting);
        Assert.Equal(cts.Token, canceled.CancellationToken);
    }

    [Fact]
    public async Task Go_CallerCancelsAfterTheGreeting_SaysWhatCameNext()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(100));

        var ex = await Assert.ThrowsAsync<NbdHandshakeCanceledException>(() =>
            NbdClient.NegotiateAsync(new SilentStream(ServerScript.Newstyle(3).ToArray()), Disk, new NbdClientOptions(), cts.Token));

        Assert.False(ex.NoGreeting);
        Assert.Equal("the reply header to NBD_OPT_GO", ex.Awaiting);
    }

    [Fact]
    public void Defaults_AreTenSeconds()
    {
        var options = new NbdClientOptions();
        Assert.Equal(TimeSpan.FromSeconds(10), options.ConnectTimeout);
        Assert.Equal(TimeSpan.FromSeconds(10), options.HandshakeTimeout);
        Assert.Equal(100_000, options.MaxListEntries);
    }
}

using Microsoft.Extensions.Hosting.Systemd;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Time.Testing;
using NbdDaemon.Mappings;
using NbdDaemon.Systemd;
using NbdDaemon.Tests.Mappings;

namespace NbdDaemon.Tests.Systemd;

[CollectionDefinition(nameof(EnvironmentMutating), DisableParallelization = true)]
public sealed class EnvironmentMutating;

[Collection(nameof(EnvironmentMutating))]
public sealed class SystemdNotificationsTests
{
    private static readonly TimeSpan TestTimeout = TimeSpan.FromSeconds(10);

    /// <summary>The stock notifier reads NOTIFY_SOCKET when constructed; set it only for that moment.</summary>
    private static SystemdNotifier NotifierFor(string path)
    {
        Environment.SetEnvironmentVariable("NOTIFY_SOCKET", path);
        try
        {
            return new SystemdNotifier();
        }
        finally
        {
            Environment.SetEnvironmentVariable("NOTIFY_SOCKET", null);
        }
    }

    [Fact]
    public async Task Notifications_StartServeAndWatchdogTicks_ExactDatagrams()
    {
        using var dir = new TempDirectory();
        using var systemd = new DatagramListener(dir.File("notify"));
        var time = new FakeTimeProvider();
        using var supervisor = new MappingSupervisor(
            [TestMappings.Create("data")], new FakeConnector().ThenServe(), new FakeKernel(), time, NullLoggerFactory.Instance);
        using var notifications = new SystemdNotifications(
            NotifierFor(systemd.Path), supervisor, time, new WatchdogSettings(TimeSpan.FromSeconds(30)), NullLogger<SystemdNotifications>.Instance);

        await notifications.StartAsync(CancellationToken.None);
        Assert.Equal("STATUS=0 of 1 mappings serving", await systemd.ReceiveTextAsync());
        Assert.Equal("WATCHDOG=1", await systemd.ReceiveTextAsync());

        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);
        Assert.Equal("STATUS=1 of 1 mappings serving", await systemd.ReceiveTextAsync());
        await systemd.AssertSilentAsync(TimeSpan.FromMilliseconds(200));

        time.Advance(TimeSpan.FromSeconds(14));
        await systemd.AssertSilentAsync(TimeSpan.FromMilliseconds(200));
        time.Advance(TimeSpan.FromSeconds(1));
        Assert.Equal("WATCHDOG=1", await systemd.ReceiveTextAsync());

        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
        await notifications.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
        Assert.Equal("STATUS=0 of 1 mappings serving", await systemd.ReceiveTextAsync());
        time.Advance(TimeSpan.FromSeconds(15));
        await systemd.AssertSilentAsync(TimeSpan.FromMilliseconds(200));
    }

    [Fact]
    public async Task Tick_LoopStuckInKernelCall_WithholdsWatchdogUntilItRecovers()
    {
        using var dir = new TempDirectory();
        using var systemd = new DatagramListener(dir.File("notify"));
        var time = new FakeTimeProvider();
        using var release = new ManualResetEventSlim();
        var kernel = new FakeKernel { OnOperation = op => { if (op == "set-sock") { release.Wait(TestTimeout); } } };
        using var supervisor = new MappingSupervisor(
            [TestMappings.Create("data")], new FakeConnector().ThenServe(), kernel, time, NullLoggerFactory.Instance);
        using var notifications = new SystemdNotifications(
            NotifierFor(systemd.Path), supervisor, time, new WatchdogSettings((TimeSpan?)null), NullLogger<SystemdNotifications>.Instance);
        var states = new StateRecorder(supervisor.Loops[0]);
        Task start = supervisor.StartAsync(CancellationToken.None);
        await states.WaitForAsync(MappingState.ConfiguringKernel);

        Assert.True(notifications.Tick());
        Assert.Equal("WATCHDOG=1", await systemd.ReceiveTextAsync());
        time.Advance(TimeSpan.FromMinutes(2));
        Assert.False(supervisor.IsHealthy());
        Assert.False(notifications.Tick());
        await systemd.AssertSilentAsync(TimeSpan.FromMilliseconds(200));

        release.Set();
        await start.WaitAsync(TestTimeout);
        Assert.True(notifications.Tick());
        Assert.Equal("WATCHDOG=1", await systemd.ReceiveTextAsync());
        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
    }

    [Theory]
    [InlineData("30000000", null, 15.0)]
    [InlineData("30000000", "self", 15.0)]
    [InlineData("30000000", "1", null)]
    [InlineData("0", null, null)]
    [InlineData("abc", null, null)]
    [InlineData(null, null, null)]
    public void WatchdogSettings_FromEnvironment_HalfOfUsecOnlyForUs(string? usec, string? pid, double? expectedSeconds)
    {
        int self = Environment.ProcessId;
        string? pidValue = pid == "self" ? self.ToString(System.Globalization.CultureInfo.InvariantCulture) : pid;
        var settings = WatchdogSettings.FromEnvironment(
            name => name switch { "WATCHDOG_USEC" => usec, "WATCHDOG_PID" => pidValue, _ => null }, self);
        Assert.Equal(expectedSeconds, settings.PingInterval?.TotalSeconds);
    }
}

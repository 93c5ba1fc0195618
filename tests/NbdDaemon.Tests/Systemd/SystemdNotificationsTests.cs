using Microsoft.Extensions.Hosting.Systemd;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Time.Testing;
using NbdDaemon.Configuration;
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
        await start.WaitAsync(TestTimeout); // returned at the ready deadline already (the 2 minutes passed it)
        await states.WaitForAsync(MappingState.Serving);
        Assert.True(notifications.Tick());
        Assert.Equal("WATCHDOG=1", await systemd.ReceiveTextAsync());
        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
    }

    [Fact]
    public async Task Notifications_NotifySocketGone_TransitionsAndStopRunAndTheDeviceIsReleased()
    {
        // The stock notifier throws when the socket refuses a datagram; STATUS= is sent inside each mapping transition.
        using var dir = new TempDirectory();
        string path = dir.File("notify");
        var systemd = new DatagramListener(path);
        var time = new FakeTimeProvider();
        var kernel = new FakeKernel();
        using var supervisor = new MappingSupervisor(
            [TestMappings.Create("data")], new FakeConnector().ThenServe(), kernel, time, NullLoggerFactory.Instance);
        using var notifications = new SystemdNotifications(
            NotifierFor(path), supervisor, time, new WatchdogSettings(TimeSpan.FromSeconds(30)), NullLogger<SystemdNotifications>.Instance);
        await notifications.StartAsync(CancellationToken.None);
        systemd.Dispose();
        File.Delete(path);

        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);
        Assert.Equal(MappingState.Serving, supervisor.Loops[0].State);
        Assert.False(notifications.Tick());
        await supervisor.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);
        await notifications.StopAsync(CancellationToken.None).WaitAsync(TestTimeout);

        Assert.Equal(MappingState.Stopped, supervisor.Loops[0].State);
        Assert.Contains("disconnect", kernel.Operations);
        Assert.Equal("close /dev/nbd3", kernel.Operations[^1]);
    }

    [Fact]
    public async Task SendStatus_ManyFailingMappings_DatagramFitsSystemdsBuffer()
    {
        using var dir = new TempDirectory();
        using var systemd = new DatagramListener(dir.File("notify"));
        var time = new FakeTimeProvider();
        MappingOptions[] mappings = [.. Enumerable.Range(0, 40).Select(i => TestMappings.Create(
            new string('m', 60) + i.ToString("00", System.Globalization.CultureInfo.InvariantCulture), device: null))];
        var refusal = new MappingException(new string('r', 100));
        using var supervisor = new MappingSupervisor(
            mappings, new FakeConnector().Then(_ => Task.FromException<INbdSession>(refusal)), new FakeKernel(), time, NullLoggerFactory.Instance);
        using var notifications = new SystemdNotifications(
            NotifierFor(systemd.Path), supervisor, time, new WatchdogSettings((TimeSpan?)null), NullLogger<SystemdNotifications>.Instance);
        // Read as systemd does, all along, on a thread of its own: the stock notifier's send blocks once the socket's
        // queue is full, and 40 loops blocked there would leave no pool thread for a reader on the pool.
        var datagrams = new List<byte[]>();
        using var reading = new CancellationTokenSource();
        var readerThread = new Thread(() =>
        {
            while (!reading.IsCancellationRequested)
            {
                try
                {
                    datagrams.Add(systemd.Receive(TimeSpan.FromMilliseconds(500)));
                }
                catch (TimeoutException)
                {
                }
            }
        });
        readerThread.Start();

        await notifications.StartAsync(CancellationToken.None);
        await supervisor.StartAsync(CancellationToken.None).WaitAsync(TestTimeout);
        Assert.True(supervisor.StatusText.Length > 4096, "the case needs a status longer than systemd's buffer");
        await Task.Delay(1000);
        reading.Cancel();
        Assert.True(readerThread.Join(TestTimeout));

        Assert.All(datagrams, d => Assert.InRange(d.Length, 1, 4096));
        string text = System.Text.Encoding.UTF8.GetString(datagrams[^1]);
        Assert.StartsWith("STATUS=0 of 40 mappings serving; failing: ", text, StringComparison.Ordinal);
        Assert.EndsWith("…", text, StringComparison.Ordinal);
        Assert.Equal(SystemdNotifications.MaxStatusChars, text.Length - "STATUS=".Length);
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

    [Fact]
    public void StatusLine_CutInsideASurrogatePair_PairDroppedWhole()
    {
        int cut = SystemdNotifications.MaxStatusChars - 1;
        string status = new string('x', cut - 1) + "😀" + new string('y', 50);
        string line = SystemdNotifications.StatusLine(status);
        Assert.Equal(new string('x', cut - 1) + "…", line);
        Assert.DoesNotContain("\uFFFD", System.Text.Encoding.UTF8.GetString(System.Text.Encoding.UTF8.GetBytes(line)), StringComparison.Ordinal);
    }

    [Fact]
    public void StatusLine_LongStatus_CutToTheLimitWithAnEllipsis()
    {
        string line = SystemdNotifications.StatusLine(new string('x', 5000));
        Assert.Equal(new string('x', SystemdNotifications.MaxStatusChars - 1) + "…", line);
    }

    [Fact]
    public void StatusLine_NewlinesInTheStatus_OneLine() =>
        Assert.Equal("a b c", SystemdNotifications.StatusLine("a\nb\r\nc"));
}

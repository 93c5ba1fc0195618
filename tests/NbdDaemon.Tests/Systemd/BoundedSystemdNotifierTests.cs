using System.Diagnostics;
using System.Net.Sockets;
using Microsoft.Extensions.Hosting.Systemd;
using NbdDaemon.Systemd;

namespace NbdDaemon.Tests.Systemd;

/// <summary>
/// The notifier against a stand-in for systemd's notification socket. "Full" is what PID 1 busy or stuck looks like
/// from here: a datagram socket whose queue nobody reads (net.unix.max_dgram_qlen datagrams, 10 by default, 512 under
/// systemd's sysctl.d), after which a plain send waits until the reader comes back.
/// </summary>
public sealed class BoundedSystemdNotifierTests : IDisposable
{
    private readonly TempDirectory _dir = new();

    public void Dispose() => _dir.Dispose();

    [Fact]
    public async Task Notify_SendsTheTextAsOneDatagram()
    {
        using var systemd = new DatagramListener(_dir.File("notify"));
        var notifier = new BoundedSystemdNotifier(systemd.Path);

        notifier.Notify(new ServiceState("STATUS=1 of 1 mappings serving"));

        Assert.True(notifier.IsEnabled);
        Assert.Equal("STATUS=1 of 1 mappings serving", await systemd.ReceiveTextAsync());
    }

    [Fact]
    public async Task Notify_AbstractSocketName_SentThere()
    {
        string name = "nbd-daemon-test-" + Guid.NewGuid().ToString("N");
        using var systemd = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        systemd.Bind(new UnixDomainSocketEndPoint("\0" + name));

        new BoundedSystemdNotifier("@" + name).Notify(new ServiceState("WATCHDOG=1"));

        byte[] buffer = new byte[64];
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        int n = await systemd.ReceiveAsync(buffer, SocketFlags.None, cts.Token);
        Assert.Equal("WATCHDOG=1", System.Text.Encoding.UTF8.GetString(buffer, 0, n));
    }

    [Fact]
    public void Notify_NoSocket_DisabledAndNothingSent()
    {
        var notifier = BoundedSystemdNotifier.FromEnvironment(_ => "");
        Assert.False(notifier.IsEnabled);
        notifier.Notify(new ServiceState("STATUS=x")); // no exception
    }

    [Theory]
    [InlineData("/run/systemd/notify", null)]
    [InlineData("@/org/freedesktop/systemd1/notify/123", null)]
    [InlineData("/", "not an absolute path nor '@' and an abstract name")]
    [InlineData("run/notify", "not an absolute path nor '@' and an abstract name")]
    [InlineData("vsock:2:1234", "an AF_VSOCK address, which only a whole machine's init uses to notify its host; this daemon speaks AF_UNIX only")]
    public void Problem_FollowsSdNotify(string value, string? problem) => Assert.Equal(problem, NotifySocket.Problem(value));

    /// <summary>
    /// The longest usable path (107 bytes: sun_path keeps room for the NUL, as sd_notify insists) is usable and a real
    /// socket receives on it; one byte more, counted in UTF-8, is refused. A 125-byte value ended the start with an
    /// unhandled exception from the first STATUS=.
    /// </summary>
    [Fact]
    public async Task FromEnvironment_LongestPathWorks_OneByteMoreDisablesNotifications()
    {
        string prefix = _dir.File("s");
        string longest = prefix + new string('n', NotifySocket.SunPathBytes - 1 - prefix.Length);
        Assert.Equal(107, longest.Length);
        using (var systemd = new DatagramListener(longest))
        {
            var notifier = BoundedSystemdNotifier.FromEnvironment(name => name == "NOTIFY_SOCKET" ? longest : null);
            Assert.True(notifier.IsEnabled);
            notifier.Notify(new ServiceState("STATUS=x"));
            Assert.Equal("STATUS=x", await systemd.ReceiveTextAsync());
        }

        string over = longest[..^1] + "é"; // 108 bytes in 107 characters
        Assert.Equal("108 bytes, more than a socket address holds (107 at most)", NotifySocket.Problem(over));
        var disabled = BoundedSystemdNotifier.FromEnvironment(name => name == "NOTIFY_SOCKET" ? over : null);
        Assert.False(disabled.IsEnabled);
        disabled.Notify(new ServiceState("STATUS=x")); // no exception
        Assert.Null(NotifySocket.Usable(name => name == "NOTIFY_SOCKET" ? over : null));
    }

    [Theory]
    [InlineData("STATUS=0 of 1 mappings serving")]
    [InlineData("WATCHDOG=1")]
    public void Notify_SystemdNotReading_StatusAndWatchdogGiveUpAfterTheLimit(string state)
    {
        using var systemd = new DatagramListener(_dir.File("notify"));
        FillQueue(systemd.Path);
        var notifier = new BoundedSystemdNotifier(systemd.Path);
        var clock = Stopwatch.StartNew();

        var refused = Assert.Throws<SocketException>(() => notifier.Notify(new ServiceState(state)));

        // The stock notifier would still be waiting here, holding the mapping transition that sent it.
        Assert.InRange(clock.Elapsed, BoundedSystemdNotifier.StatusSendLimit * 0.9, BoundedSystemdNotifier.StatusSendLimit + TimeSpan.FromSeconds(5));
        Assert.Contains(refused.SocketErrorCode, new[] { SocketError.TimedOut, SocketError.WouldBlock });
    }

    [Theory]
    [InlineData("READY=1")]
    [InlineData("STOPPING=1")]
    public void Notify_SystemdNotReading_ReadyAndStoppingWaitUntilItReadsAgain(string state)
    {
        using var systemd = new DatagramListener(_dir.File("notify"));
        int queued = FillQueue(systemd.Path);
        var notifier = new BoundedSystemdNotifier(systemd.Path);
        Exception? failure = null;
        var sender = new Thread(() =>
        {
            try
            {
                notifier.Notify(new ServiceState(state));
            }
            catch (SocketException e)
            {
                failure = e;
            }
        });
        sender.Start();

        Assert.False(sender.Join(BoundedSystemdNotifier.StatusSendLimit * 2), "a lifecycle notification gave up instead of waiting");
        for (int i = 0; i < queued; i++)
        {
            systemd.Receive(TimeSpan.FromSeconds(5));
        }

        Assert.True(sender.Join(TimeSpan.FromSeconds(10)));
        Assert.Null(failure);
        Assert.Equal(state, System.Text.Encoding.UTF8.GetString(systemd.Receive(TimeSpan.FromSeconds(5))));
    }

    /// <summary>
    /// Sends without waiting until the reader's queue refuses more; returns how many datagrams it holds. A sender also
    /// gets EAGAIN when its own send buffer is full of datagrams nobody read (about 270 of these), before a queue of 512
    /// (systemd's net.unix.max_dgram_qlen) is full: so senders are added until a fresh one is refused its first.
    /// </summary>
    private static int FillQueue(string path)
    {
        var endpoint = new UnixDomainSocketEndPoint(path);
        var senders = new List<Socket>();
        int sent = 0;
        try
        {
            for (int s = 0; s < 64; s++)
            {
                var sender = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified) { Blocking = false };
                senders.Add(sender);
                int bySender = 0;
                while (true)
                {
                    try
                    {
                        sender.SendTo("FILL=1"u8, endpoint);
                        bySender++;
                        sent++;
                    }
                    catch (SocketException e) when (e.SocketErrorCode == SocketError.WouldBlock)
                    {
                        break;
                    }
                }

                if (bySender == 0)
                {
                    Assert.True(sent > 0, "the queue refused the first datagram");
                    return sent; // the reader's queue itself is full
                }
            }
        }
        finally
        {
            // Datagrams already queued stay queued when their sender closes.
            foreach (Socket sender in senders)
            {
                sender.Dispose();
            }
        }

        throw new InvalidOperationException("the datagram queue never filled");
    }
}

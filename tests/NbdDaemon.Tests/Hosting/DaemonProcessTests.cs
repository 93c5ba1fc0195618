using System.Diagnostics;
using NbdDaemon.Tests.Systemd;

namespace NbdDaemon.Tests.Hosting;

/// <summary>Runs the real nbd-daemon executable (built next to the tests) as systemd would.</summary>
[Collection(nameof(EnvironmentMutating))]
public sealed class DaemonProcessTests
{
    private static readonly string Executable = Path.Combine(AppContext.BaseDirectory, "nbd-daemon");

    /// <param name="args">The daemon's command line.</param>
    /// <param name="environment">Set in the daemon's environment (the systemd variables are cleared first).</param>
    /// <param name="defaultSigint">
    /// Through <c>env --default-signal=INT</c>: a test run started in the background of a script inherits SIGINT
    /// ignored, and a process started with SIGINT ignored keeps ignoring it (as it should), so Ctrl-C needs it reset.
    /// </param>
    private static Process Start(IEnumerable<string> args, IDictionary<string, string?> environment, bool defaultSigint = false)
    {
        Assert.True(File.Exists(Executable), $"daemon executable missing: {Executable}");
        var psi = new ProcessStartInfo(defaultSigint ? "env" : Executable)
        {
            RedirectStandardError = true,
            RedirectStandardOutput = true,
            UseShellExecute = false,
        };
        if (defaultSigint)
        {
            psi.ArgumentList.Add("--default-signal=INT");
            psi.ArgumentList.Add(Executable);
        }

        foreach (string a in args)
        {
            psi.ArgumentList.Add(a);
        }

        foreach (string name in new[] { "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID" })
        {
            psi.Environment.Remove(name);
        }

        foreach ((string key, string? value) in environment)
        {
            psi.Environment[key] = value;
        }

        return Process.Start(psi)!;
    }

    private static Task SignalTerm(Process process) => Signal(process, "TERM");

    private static async Task Signal(Process process, string signal)
    {
        using var kill = Process.Start("kill", ["-" + signal, process.Id.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
        await kill.WaitForExitAsync();
        Assert.Equal(0, kill.ExitCode);
    }

    [Fact]
    public async Task Run_UnderNotifySocket_CtrlCStopsCleanlyAsSigtermDoes()
    {
        // NOTIFY_SOCKET (systemd-run -t, run0) selects systemd's lifetime, which handles SIGTERM only: Ctrl-C killed the
        // process (exit 130) without a single mapping torn down.
        using var dir = new TempDirectory();
        using var systemd = new DatagramListener(dir.File("notify"));
        using Process p = Start(
            ["--Nbd:Mappings:0:Name=data", "--Nbd:Mappings:0:Uri=nbd://127.0.0.1:1/data", "--Nbd:Mappings:0:Reconnect:InitialDelay=00:00:30"],
            new Dictionary<string, string?> { ["NOTIFY_SOCKET"] = systemd.Path }, defaultSigint: true);
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        Task<string> stdout = p.StandardOutput.ReadToEndAsync();
        string note;
        do
        {
            note = await systemd.ReceiveTextAsync(TimeSpan.FromSeconds(30));
        }
        while (note != "READY=1");

        await Signal(p, "INT");
        Assert.Equal("STOPPING=1", await systemd.ReceiveTextAsync());
        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(25));

        string log = await stderr;
        Assert.True(0 == p.ExitCode, $"exit {p.ExitCode}; stderr: {log}; stdout: {await stdout}");
        Assert.Contains("Mapping data on (unassigned) (127.0.0.1:1, export 'data'): Stopping -> Stopped", log, StringComparison.Ordinal);
    }

    /// <summary>
    /// SIGHUP's default action ended the process at once, no mapping torn down (Ioctl devices die with it, and systemd
    /// counts death by SIGHUP as a clean exit: Restart=on-failure left the unit down); an admin sends it expecting a reload. It is ignored with a warning that says
    /// what to do instead, under either lifetime.
    /// </summary>
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task Run_Sighup_IgnoredWithAWarning_KeepsRunning_SigtermStillStops(bool underNotifySocket)
    {
        using var dir = new TempDirectory();
        using var systemd = new DatagramListener(dir.File("notify"));
        using Process p = Start(
            ["--Nbd:Mappings:0:Name=data", "--Nbd:Mappings:0:Uri=nbd://127.0.0.1:1/data", "--Nbd:Mappings:0:Reconnect:InitialDelay=00:00:30"],
            underNotifySocket ? new Dictionary<string, string?> { ["NOTIFY_SOCKET"] = systemd.Path } : new Dictionary<string, string?>());
        var stderr = new StderrLines(p);
        Task started = stderr.Seen("Idle -> Connecting"); // the supervisor starts after the signal handlers
        Task warned = stderr.Seen("SIGHUP ignored: there is no reload");
        Task<string> stdout = p.StandardOutput.ReadToEndAsync();
        await started.WaitAsync(TimeSpan.FromSeconds(30));

        await Signal(p, "HUP");
        await warned.WaitAsync(TimeSpan.FromSeconds(10));
        await Task.Delay(500);
        Assert.False(p.HasExited, $"exited after SIGHUP with {(p.HasExited ? p.ExitCode : 0)}");

        await SignalTerm(p);
        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(25));
        string log = await stderr.AllAsync();

        Assert.True(0 == p.ExitCode, $"exit {p.ExitCode}; stderr: {log}; stdout: {await stdout}");
        Assert.Contains("systemctl restart nbd-daemon", log, StringComparison.Ordinal);
        Assert.Contains("Mapping data on (unassigned) (127.0.0.1:1, export 'data'): Stopping -> Stopped", log, StringComparison.Ordinal);
    }

    /// <summary>
    /// A NOTIFY_SOCKET set by hand that no socket address can hold (systemd never sets one) ended the start with an
    /// unhandled ArgumentOutOfRangeException from the first STATUS=. It is a warning naming the problem, and the daemon runs
    /// without notifications.
    /// </summary>
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task Run_UnusableNotifySocket_WarnsAndRunsWithoutNotifications(bool tooLong)
    {
        string notifySocket = tooLong ? "/run/" + new string('n', 120) : "run/notify";
        using Process p = Start(
            ["--Nbd:Mappings:0:Name=data", "--Nbd:Mappings:0:Uri=nbd://127.0.0.1:1/data", "--Nbd:Mappings:0:Reconnect:InitialDelay=00:00:30"],
            new Dictionary<string, string?> { ["NOTIFY_SOCKET"] = notifySocket });
        var stderr = new StderrLines(p);
        Task started = stderr.Seen("Idle -> Connecting");
        Task<string> stdout = p.StandardOutput.ReadToEndAsync();
        await Task.WhenAny(started, p.WaitForExitAsync()).WaitAsync(TimeSpan.FromSeconds(30));
        await Task.Delay(500);
        Assert.False(p.HasExited, $"exited at start with {(p.HasExited ? p.ExitCode : 0)}: {stderr.Text}");

        await SignalTerm(p);
        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(25));
        string log = await stderr.AllAsync();

        Assert.True(0 == p.ExitCode, $"exit {p.ExitCode}; stderr: {log}; stdout: {await stdout}");
        Assert.Contains($"NOTIFY_SOCKET={notifySocket} is unusable ({(tooLong ? "125 bytes, more than a socket address holds (107 at most)" : "not an absolute path nor '@' and an abstract name")})", log, StringComparison.Ordinal);
        Assert.DoesNotContain("Unhandled exception", log, StringComparison.Ordinal);
        Assert.Contains("Stopping -> Stopped", log, StringComparison.Ordinal);
    }

    /// <summary>
    /// A well-formed NOTIFY_SOCKET nobody listens on: READY=1 and STOPPING=1 failed inside the host's SystemdLifetime, which
    /// logged "An error occurred starting the application" and "… stopping …" at Fatal for a daemon that ran fine.
    /// </summary>
    [Theory]
    [InlineData(false, "no socket there (ENOENT)")]
    [InlineData(true, "nothing listens there (ECONNREFUSED)")]
    public async Task Run_NotifySocketNobodyListensOn_WarnsNamingItNoFatalLines(bool abstractName, string reason)
    {
        using var dir = new TempDirectory();
        string notifySocket = abstractName ? "@nbd-test-" + Guid.NewGuid().ToString("N") : dir.File("absent.sock");
        using Process p = Start(
            ["--Nbd:Mappings:0:Name=data", "--Nbd:Mappings:0:Uri=nbd://127.0.0.1:1/data", "--Nbd:Mappings:0:Reconnect:InitialDelay=00:00:30"],
            new Dictionary<string, string?> { ["NOTIFY_SOCKET"] = notifySocket });
        var stderr = new StderrLines(p);
        Task ready = stderr.Seen("systemd notification READY=1 not sent");
        await Task.WhenAny(ready, p.WaitForExitAsync()).WaitAsync(TimeSpan.FromSeconds(90));
        Assert.False(p.HasExited, $"exited at start with {(p.HasExited ? p.ExitCode : 0)}: {stderr.Text}");

        await SignalTerm(p);
        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(25));
        string log = await stderr.AllAsync();

        Assert.Equal(0, p.ExitCode);
        Assert.Contains($"systemd notification READY=1 not sent to NOTIFY_SOCKET={notifySocket}: {reason}", log, StringComparison.Ordinal);
        Assert.Contains($"systemd notification STOPPING=1 not sent to NOTIFY_SOCKET={notifySocket}: {reason}", log, StringComparison.Ordinal);
        Assert.DoesNotContain("An error occurred", log, StringComparison.Ordinal);
        Assert.DoesNotContain("[FTL]", log, StringComparison.Ordinal);
        Assert.Contains("Stopping -> Stopped", log, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Run_InvalidConfiguration_Exits78NamingKeyWithoutNotifying()
    {
        using var dir = new TempDirectory();
        using var systemd = new DatagramListener(dir.File("notify"));
        using Process p = Start(
            ["--Nbd:Mappings:0:Name=data", "--Nbd:Mappings:0:Uri=nbd://127.0.0.1/data", "--Nbd:Mappings:0:Interface=Bogus", "--Nbd:Mappings:1:Name=x"],
            new Dictionary<string, string?> { ["NOTIFY_SOCKET"] = systemd.Path });
        Task<string> stderr = p.StandardError.ReadToEndAsync();

        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));

        Assert.Equal(78, p.ExitCode);
        string errors = await stderr;
        Assert.Contains("Nbd:Mappings:0:Interface: unknown interface 'Bogus' (Ioctl or Netlink)", errors, StringComparison.Ordinal);
        Assert.Contains("Nbd:Mappings:1:Uri: is required", errors, StringComparison.Ordinal);
        await systemd.AssertSilentAsync(TimeSpan.FromMilliseconds(300));
    }

    /// <summary>
    /// A configuration or usage error with standard error full or closed: the failed write of the message ended in an
    /// unhandled exception, System.CommandLine's handler failed writing that too, and the runtime aborted (134), which
    /// systemd restarts once a second (Restart=on-failure) where 78 stops it (RestartPreventExitStatus=78).
    /// </summary>
    [Theory]
    [InlineData("2>/dev/full", "--Nbd:Mappings:0:Name=a", 78)]
    [InlineData("2>&-", "--Nbd:Mappings:0:Name=a", 78)]
    [InlineData("2>/dev/full", "--Serilog:MinimumLevel:Default=Loud", 78)]
    [InlineData("2>/dev/full", "check", 2)]
    [InlineData("2>&-", "check", 2)]
    public async Task Run_ErrorWithStandardErrorRefusing_ExitCodeStillSaysWhat(string redirect, string argument, int expected)
    {
        Assert.True(File.Exists(Executable), $"daemon executable missing: {Executable}");
        var psi = new ProcessStartInfo("/bin/sh") { UseShellExecute = false, RedirectStandardOutput = true };
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add($"exec \"$0\" \"$1\" {redirect}");
        psi.ArgumentList.Add(Executable);
        psi.ArgumentList.Add(argument);
        psi.Environment.Remove("NOTIFY_SOCKET");
        using Process p = Process.Start(psi)!;

        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));

        Assert.Equal(expected, p.ExitCode);
    }

    [Fact]
    public async Task Run_MalformedTimeSpanFromEnvironment_Exits78()
    {
        using Process p = Start([], new Dictionary<string, string?>
        {
            ["Nbd__Mappings__0__Name"] = "data",
            ["Nbd__Mappings__0__Uri"] = "nbd://127.0.0.1/data",
            ["Nbd__Mappings__0__Reconnect__MaxDelay"] = "1 minute",
        });
        Task<string> stderr = p.StandardError.ReadToEndAsync();

        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));

        Assert.Equal(78, p.ExitCode);
        Assert.Contains("Nbd:Mappings:0:Reconnect:MaxDelay: '1 minute' must be a positive TimeSpan", await stderr, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Run_UnderNotifySocket_StatusWatchdogReadyThenStoppingAndExit0()
    {
        using var dir = new TempDirectory();
        using var systemd = new DatagramListener(dir.File("notify"));
        using Process p = Start(
            ["--Nbd:Mappings:0:Name=data", "--Nbd:Mappings:0:Uri=nbd://127.0.0.1:1/data", "--Nbd:Mappings:0:Reconnect:InitialDelay=00:00:30"],
            new Dictionary<string, string?> { ["NOTIFY_SOCKET"] = systemd.Path, ["WATCHDOG_USEC"] = "60000000" });
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        Task<string> stdout = p.StandardOutput.ReadToEndAsync();

        Assert.Equal("STATUS=0 of 1 mappings serving", await systemd.ReceiveTextAsync(TimeSpan.FromSeconds(30)));
        Assert.Equal("WATCHDOG=1", await systemd.ReceiveTextAsync());
        string failing = await systemd.ReceiveTextAsync();
        Assert.StartsWith("STATUS=0 of 1 mappings serving; failing: data (", failing, StringComparison.Ordinal);
        Assert.Equal("READY=1", await systemd.ReceiveTextAsync());

        var stopwatch = Stopwatch.StartNew();
        await SignalTerm(p);
        Assert.Equal("STOPPING=1", await systemd.ReceiveTextAsync());
        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(25));

        Assert.True(0 == p.ExitCode, $"exit {p.ExitCode}; stderr: {await stderr}; stdout: {await stdout}");
        Assert.True(stopwatch.Elapsed < TimeSpan.FromSeconds(20), $"stop took {stopwatch.Elapsed}");
        Assert.Contains("Mapping data on (unassigned) (127.0.0.1:1, export 'data'): Idle -> Connecting", await stderr, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Run_SigtermBeforeReady_StopsEveryMappingAndExits0()
    {
        // A server that accepts and never greets: the first attempt waits out its 20 s Timeout, so READY=1 is 20 s away
        // when SIGTERM comes. The host does not call StopAsync after a start that failed: the stop must not fail it.
        using var server = new System.Net.Sockets.Socket(System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Tcp);
        server.Bind(new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, 0));
        server.Listen();
        int port = ((System.Net.IPEndPoint)server.LocalEndPoint!).Port;
        using var dir = new TempDirectory();
        using var systemd = new DatagramListener(dir.File("notify"));
        using Process p = Start(
            ["--Nbd:Mappings:0:Name=data", $"--Nbd:Mappings:0:Uri=nbd://127.0.0.1:{port}/data", "--Nbd:Mappings:0:Timeout=00:00:20"],
            new Dictionary<string, string?> { ["NOTIFY_SOCKET"] = systemd.Path, ["WATCHDOG_USEC"] = "60000000" });
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        Task<string> stdout = p.StandardOutput.ReadToEndAsync();
        Assert.Equal("STATUS=0 of 1 mappings serving", await systemd.ReceiveTextAsync(TimeSpan.FromSeconds(30)));
        Assert.Equal("WATCHDOG=1", await systemd.ReceiveTextAsync()); // the hosted services are starting

        await SignalTerm(p);
        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(15));

        string log = await stderr;
        Assert.True(0 == p.ExitCode, $"exit {p.ExitCode}; stderr: {log}; stdout: {await stdout}");
        var notes = new List<string>();
        try
        {
            while (true)
            {
                notes.Add(await systemd.ReceiveTextAsync(TimeSpan.FromSeconds(1)));
            }
        }
        catch (TimeoutException)
        {
            // all of them read
        }

        Assert.Contains("STOPPING=1", notes);
        Assert.DoesNotContain("READY=1", notes);
        Assert.Contains("Mapping data on (unassigned) (127.0.0.1:" + port + ", export 'data'): Stopping -> Stopped", log, StringComparison.Ordinal);
    }

    /// <summary>A daemon's stderr read line by line as it comes, so a test can wait for a line and read them all after.</summary>
    private sealed class StderrLines
    {
        private readonly List<string> _lines = [];
        private readonly List<(string Text, TaskCompletionSource Seen)> _awaited = [];
        private readonly Task _reading;

        public StderrLines(Process process) => _reading = Task.Run(async () =>
        {
            while (await process.StandardError.ReadLineAsync() is { } line)
            {
                lock (_lines)
                {
                    _lines.Add(line);
                    foreach ((string text, TaskCompletionSource seen) in _awaited)
                    {
                        if (line.Contains(text, StringComparison.Ordinal))
                        {
                            seen.TrySetResult();
                        }
                    }
                }
            }
        });

        /// <summary>Completes once a line containing <paramref name="text"/> was read (also one read before this call).</summary>
        public Task Seen(string text)
        {
            var seen = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            lock (_lines)
            {
                if (_lines.Any(l => l.Contains(text, StringComparison.Ordinal)))
                {
                    seen.TrySetResult();
                }

                _awaited.Add((text, seen));
            }

            return seen.Task;
        }

        public string Text
        {
            get
            {
                lock (_lines)
                {
                    return string.Join('\n', _lines);
                }
            }
        }

        /// <summary>Waits for the end of stderr (the process exited) and returns every line.</summary>
        public async Task<string> AllAsync()
        {
            await _reading.WaitAsync(TimeSpan.FromSeconds(10));
            return Text;
        }
    }
}

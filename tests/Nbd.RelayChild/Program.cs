using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using Microsoft.Win32.SafeHandles;
using Nbd.Kernel;
using Nbd.Protocol.Transmission;
using Nbd.Protocol;

// A relay process for the crash tests, and (in the VM) the process that keeps its descriptors.
//
//   Nbd.RelayChild relay OUR_FD DRIVER_FD JOURNAL_FD SERVER
//     Takes up the relay journal in JOURNAL_FD (new: starts it; armed: recovers from it) and relays between our end of
//     the pair (OUR_FD) and SERVER, counting on the driver's end (DRIVER_FD), until it is killed. SERVER is a unix
//     socket path (a server in transmission phase at once, no handshake: the host test's) or an nbd:// URI (handshake).
//     Says on stdout what it recovered ("RECOVERED head=… …") and when it relays ("RELAYING").
//
//   Nbd.RelayChild keep DEVICE URI KILLS DONE_FILE FINISH_FILE
//     The real-driver run (tests/vm/scenarios/relay-crash.sh): holds the pair, the journal and the device, as systemd's
//     file descriptor store and the kernel would. Configures DEVICE (ioctl, 4096-byte blocks, Timeout 30 s) with the
//     driver's end, starts a relay child, then KILLS times: waits 0.5–2.5 s and for a request in flight on the device
//     (0.5 s at most), SIGKILLs the child and starts the next one at once, which recovers. DONE_FILE.ready says the
//     device is up. Then creates DONE_FILE, waits for FINISH_FILE, disconnects the device and prints
//     "RESULT relay-crash-keeper …".
return args.Length > 0 && args[0] == "relay" && args.Length == 5 ? Relay(args[1..])
    : args.Length > 0 && args[0] == "keep" && args.Length == 6 ? Keep(args[1..])
    : Usage();

static int Usage()
{
    Console.Error.WriteLine("usage: Nbd.RelayChild relay OUR_FD DRIVER_FD JOURNAL_FD SERVER | keep DEVICE URI KILLS DONE_FILE FINISH_FILE");
    return 2;
}

static int Relay(string[] args)
{
    var ourEnd = new Socket(new SafeSocketHandle(int.Parse(args[0], CultureInfo.InvariantCulture), ownsHandle: true));
    var driverEnd = new Socket(new SafeSocketHandle(int.Parse(args[1], CultureInfo.InvariantCulture), ownsHandle: true));
    var journal = RelayJournal.Open(new SafeFileHandle(int.Parse(args[2], CultureInfo.InvariantCulture), ownsHandle: true));
    string server = args[3];
    Socket Connect()
    {
        if (server.StartsWith("nbd", StringComparison.Ordinal))
        {
            using NbdConnection connection = Handshake(server);
            return connection.DetachSocket();
        }

        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        socket.Connect(new UnixDomainSocketEndPoint(server));
        return socket;
    }

    // NBD_RELAY_CHILD_CONNECT_DELAY_MS: no first connection given; the relay's own first connect waits this long (a
    // server slow to accept): what the kernel thread reads meanwhile must wait for it.
    int delay = int.TryParse(Environment.GetEnvironmentVariable("NBD_RELAY_CHILD_CONNECT_DELAY_MS"), out int ms) ? ms : -1;
    var options = new NbdRelayOptions
    {
        Reconnect = async ct =>
        {
            if (Interlocked.Exchange(ref delay, -1) is int wait and > 0)
            {
                await Task.Delay(wait, ct);
            }

            return Connect();
        },
        GiveUpAfter = TimeSpan.FromSeconds(60),
        Name = "relay-child",
    };

    NbdRelay relay;
    try
    {
        relay = NbdRelay.Journaled(ourEnd, driverEnd, journal, delay >= 0 ? null : Connect(), options);
    }
    catch (Exception e) when (e is InvalidDataException or SocketException)
    {
        Console.WriteLine("REFUSED " + e.Message);
        return 3;
    }

    if (relay.Recovered is RelayRecovery r)
    {
        Console.WriteLine(RecoveryLine.Format(r));
    }

    relay.Start();
    Console.WriteLine("RELAYING");
    NbdRelayEnd end = relay.Completion.GetAwaiter().GetResult();
    Console.WriteLine($"ENDED {end.Reason} {end.Detail}");
    relay.Dispose();
    return 0;
}

static int Keep(string[] args)
{
    string devicePath = args[0];
    string uri = args[1];
    int kills = int.Parse(args[2], CultureInfo.InvariantCulture);
    string doneFile = args[3];
    string finishFile = args[4];

    NbdExportInfoLite export;
    using (NbdConnection first = Handshake(uri))
    {
        export = new NbdExportInfoLite(first.Export.Size, (ushort)first.Export.Flags);
    }

    (Socket driverEnd, Socket ourEnd) = NbdSocketPair.Create();
    // Both counters armed again every 64 KiB: the driver's in-kernel recv meets the driver-side re-arm (the settling peek).
    using var journal = RelayJournal.Create(1 << 20, rearmAfter: 64 << 10);
    var child = Child.Start(ourEnd, driverEnd, journal, uri);
    string? first0 = child.WaitRelaying();
    if (first0 is not null)
    {
        Console.WriteLine("RESULT relay-crash-keeper error=first-child " + first0);
        return 1;
    }

    using var device = NbdDevice.Open(devicePath);
    device.SetBlockSize(4096);
    device.SetSizeBytes(export.Size);
    device.SetFlags(export.Flags);
    device.SetTimeout(TimeSpan.FromSeconds(30));
    device.SetSocket(driverEnd);
    NbdServiceLoop loop = device.StartServiceLoop();
    var wait = Stopwatch.StartNew();
    while (!NbdSysfs.Read(device.Index).IsConnected && wait.Elapsed < TimeSpan.FromSeconds(15))
    {
        Thread.Sleep(20);
    }

    File.WriteAllText(doneFile + ".ready", "");
    var random = new Random(20261207);
    int withPending = 0, cut = 0, behind = 0, refused = 0, inFlightAtKill = 0;
    long restartMax = 0;
    int made = 0;
    for (int k = 1; k <= kills; k++)
    {
        // A random moment, then the first one (within 0.5 s) with a request of the block layer's in flight on the device:
        // the kills worth making land while the driver waits for a reply.
        Thread.Sleep(random.Next(500, 2500));
        var inFlight = Stopwatch.StartNew();
        while (InFlight(device.Index) == 0 && inFlight.ElapsedMilliseconds < 500)
        {
            Thread.SpinWait(100);
        }

        child.Kill();
        made++;
        int waiting = InFlight(device.Index);
        inFlightAtKill += waiting > 0 ? 1 : 0;
        var restart = Stopwatch.StartNew();
        child = Child.Start(ourEnd, driverEnd, journal, uri);
        string? problem = child.WaitRelaying();
        restartMax = Math.Max(restartMax, restart.ElapsedMilliseconds);
        if (problem is not null)
        {
            refused++;
            Console.WriteLine($"NOTE relay-crash kill {k}: the successor did not relay: {problem}");
            break;
        }

        RelayRecovery? r = child.Recovered;
        withPending += r is { Pending: > 0 } ? 1 : 0;
        cut += r is { Finished: > 0 } ? 1 : 0;
        behind += r is { Delivered: > 1 } ? 1 : 0;
        Console.WriteLine($"NOTE relay-crash kill {k}: in_flight={waiting} {child.RecoveredLine} restart_ms={restart.ElapsedMilliseconds}");
    }

    File.WriteAllText(doneFile, "");
    while (!File.Exists(finishFile))
    {
        Thread.Sleep(50);
    }

    loop.Stop();
    bool stopped = loop.Completion.Wait(TimeSpan.FromSeconds(30));
    child.Kill();
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
        $"RESULT relay-crash-keeper kills={made} refused={refused} in_flight_at_kill={inFlightAtKill} with_pending={withPending} cut_replies={cut} answered_behind={behind} restart_ms_max={restartMax} stopped={(stopped ? "yes" : "no")} max_sectors_kb={File.ReadAllText($"/sys/block/nbd{device.Index}/queue/max_sectors_kb").Trim()}"));
    return 0;
}

// A handshake, tried 6 times: nbd-server under TCG may take more than the client's 10 s to greet its first client.
static NbdConnection Handshake(string uri)
{
    for (int attempt = 1; ; attempt++)
    {
        try
        {
            return NbdClient.ConnectAsync(NbdUri.Parse(uri)).GetAwaiter().GetResult();
        }
        catch (Exception e) when (attempt < 6 && e is NbdException or SocketException or IOException)
        {
            Console.Error.WriteLine($"handshake attempt {attempt} failed: {e.Message}");
        }
    }
}

// /sys/block/nbdN/inflight: the device's reads and writes in flight ("R W").
static int InFlight(int index) => File.ReadAllText($"/sys/block/nbd{index}/inflight").Split(' ', StringSplitOptions.RemoveEmptyEntries).Sum(int.Parse);

internal readonly record struct NbdExportInfoLite(ulong Size, ushort Flags);

/// <summary>One relay process (this program, "relay" mode) on duplicates of the three descriptors.</summary>
internal sealed class Child
{
    private readonly Process _process;
    private readonly System.Collections.Concurrent.BlockingCollection<string> _lines = [];

    private Child(Process process) => _process = process;

    public RelayRecovery? Recovered { get; private set; }

    public string RecoveredLine { get; private set; } = "new journal";

    public static Child Start(Socket ourEnd, Socket driverEnd, RelayJournal journal, string server)
    {
        // dup(2) leaves close-on-exec off: the child inherits them; closed here once it has.
        int[] fds = [Dup((int)ourEnd.Handle), Dup((int)driverEnd.Handle), Dup((int)journal.File.DangerousGetHandle())];
        try
        {
            var info = new ProcessStartInfo(Environment.ProcessPath!, ["relay", .. fds.Select(fd => fd.ToString(CultureInfo.InvariantCulture)), server])
            {
                RedirectStandardOutput = true,
            };
            var process = new Process { StartInfo = info };
            var child = new Child(process);
            process.OutputDataReceived += (_, e) =>
            {
                if (e.Data is not null)
                {
                    child._lines.Add(e.Data);
                }
            };
            process.Start();
            process.BeginOutputReadLine();
            return child;
        }
        finally
        {
            foreach (int fd in fds)
            {
                _ = Close(fd);
            }
        }
    }

    /// <summary>Null once the child relays; else what it said instead.</summary>
    public string? WaitRelaying()
    {
        while (_lines.TryTake(out string? line, TimeSpan.FromSeconds(60)))
        {
            if (RecoveryLine.Parse(line) is RelayRecovery recovered)
            {
                RecoveredLine = line;
                Recovered = recovered;
            }
            else if (line == "RELAYING")
            {
                return null;
            }
            else
            {
                return line;
            }
        }

        return "nothing within 60 s";
    }

    public void Kill()
    {
        if (!_process.HasExited)
        {
            _process.Kill();
        }

        _process.WaitForExit();
        _process.Dispose();
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "dup")]
    private static extern int Dup(int fd);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "close")]
    private static extern int Close(int fd);
}

/// <summary>The line a relay child says what it recovered with: "RECOVERED head=… tail=… …" (read by the tests too).</summary>
internal static class RecoveryLine
{
    private const string Prefix = "RECOVERED ";

    public static string Format(RelayRecovery r) => string.Create(
        CultureInfo.InvariantCulture,
        $"{Prefix}head={r.Head} tail={r.Tail} parsed={r.Parsed} sent={r.Sent} finished={r.Finished} last={r.LastReplyLength} pending={r.Pending} delivered={r.Delivered}");

    /// <summary>The recovery a <see cref="Format"/> line says; null for any other line.</summary>
    public static RelayRecovery? Parse(string line)
    {
        if (!line.StartsWith(Prefix, StringComparison.Ordinal))
        {
            return null;
        }

        Dictionary<string, long> f = line[Prefix.Length..].Split(' ').Select(p => p.Split('=')).ToDictionary(p => p[0], p => long.Parse(p[1], CultureInfo.InvariantCulture));
        return new RelayRecovery(f["head"], f["tail"], f["parsed"], f["sent"], f["finished"], f["last"], (int)f["pending"], (int)f["delivered"]);
    }
}

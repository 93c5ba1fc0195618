using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using Nbd.Protocol.Tests.TestSupport;
using Nbd.Protocol.Transmission;
using TestSupport;
using Xunit.Abstractions;
using static Nbd.Protocol.Tests.TestSupport.RawTransmission;
using static Nbd.Protocol.Tests.Transmission.RelayTest;

namespace Nbd.Protocol.Tests.Transmission;

/// <summary>
/// A relay process killed (SIGKILL) at random moments under load, and a successor process started on the same
/// descriptors (our end of the pair, the driver's end, the journal's memfd: what systemd's file descriptor store would
/// keep), which recovers from the journal (<see cref="NbdRelay.Journaled"/>). The test plays the driver on its end of the
/// pair and keeps reading replies throughout, as the driver does; the server is in this process.
/// </summary>
public sealed class NbdRelayCrashTests(ITestOutputHelper output)
{
    private const int Block = 4096;
    private const int Blocks = 16384; // a 64 MiB disk
    private const int MaxInFlight = 16;

    /// <summary>At least this many kills: 8, or NBD_RELAY_CRASH_KILLS (the long run: README, "Tests").</summary>
    private static readonly int Kills = int.TryParse(Environment.GetEnvironmentVariable("NBD_RELAY_CRASH_KILLS"), out int kills) && kills > 0 ? kills : 8;

    private static readonly string ChildDll = Path.Combine(AppContext.BaseDirectory, "Nbd.RelayChild.dll");

    /// <summary>
    /// Every request gets exactly one whole, correct reply across the kills: a reply to a cookie not in flight (one the
    /// driver had answered already, or never sent) fails, and so does a cut reply (the next reply's bytes would be read as
    /// its data, or as a header without the reply magic). Reads come back with the data last written, and the disk ends
    /// with every write. (The server carries out nothing on a connection once a later one exists, as a server process that
    /// died would: else a write resent after a kill could land before a late copy of itself from the dead connection.)
    /// The counters are armed again every 64 KiB, so kills also land inside arms; every third successor is itself killed
    /// at a random moment of its start, often inside its recovery. The kills must have landed where it matters: with
    /// requests unanswered, inside a reply to the driver, with several answered behind an unanswered one, and inside a
    /// request not yet received whole.
    /// </summary>
    [Fact(Timeout = 300_000)]
    public async Task Relay_KilledAtRandomMomentsUnderLoad_SuccessorGivesEveryRequestExactlyOneWholeReply()
    {
        await Task.Yield(); // the rest runs off the caller's thread, so that the Timeout can act

        // Replies out of order (up to 4 held, sent last first), as a threaded server sends them: a request answered behind
        // an older unanswered one stays in the ring, marked delivered, which a successor must not answer again.
        await using var server = new InMemoryNbdServer(Blocks * Block, _ => new ConnectionScript(ReorderBatch: 4, ReorderWhenIdle: true, DropWhenSuperseded: true));
        server.Fill(seed: 61);
        (Socket ourEnd, Socket driverEnd) = RelayHarness.UnixPair();

        // Replies of up to 128 KiB through a 16 KiB send buffer: the relay spends much of its time inside a send to the
        // driver, so kills land inside replies.
        ourEnd.SendBufferSize = 16 << 10;
        var journal = RelayJournal.Create(1 << 20, rearmAfter: 64 << 10);
        var driver = new Driver(driverEnd, server.Disk, new Random(62));
        Child? child = null;
        try
        {
            driver.Start();
            var random = new Random(63);
            var recoveries = new List<string>();
            int kills = 0, startKills = 0, withPending = 0, cutReplies = 0, behindUnanswered = 0, partialRequests = 0;
            bool Enough() => kills >= Kills && withPending >= 3 && cutReplies >= 2 && behindUnanswered >= 2 && partialRequests >= 1;
            while (kills < Math.Max(60, Kills) && !Enough())
            {
                child = Child.Start(ourEnd, driverEnd, journal, server.UnixPath!);
                if (kills % 3 == 2)
                {
                    // Killed while it starts: before, inside or after its recovery (which waits for the driver to read
                    // what the previous kill left unread at its end, up to 0.7 s).
                    Thread.Sleep(random.Next(0, 900));
                    child.Kill();
                    child = null;
                    kills++;
                    startKills++;
                    continue;
                }

                RelayRecovery? recovered = child.WaitRelaying(kills == 0, driver);
                if (recovered is not null)
                {
                    recoveries.Add(child.RecoveredLine!);
                    withPending += recovered.Pending > 0 ? 1 : 0;

                    // Some of the reply had gone out, not all of it.
                    cutReplies += recovered.Finished > 0 && recovered.Finished < recovered.LastReplyLength ? 1 : 0;

                    // More delivered than the one the last record names: marks in the journal were needed.
                    behindUnanswered += recovered.Delivered > 1 ? 1 : 0;
                    partialRequests += recovered.Parsed < recovered.Head ? 1 : 0;
                }

                child.WhileRelaying(() => driver.WaitForReplies(20, TimeSpan.FromSeconds(20)));
                Thread.Sleep(random.Next(0, 60));

                // Every other kill, the driver stops reading for a while first: reply bytes the relay sent lie unread at
                // its end when the successor starts, and are not what the driver consumed yet.
                if (kills % 2 == 1)
                {
                    driver.PauseReading(TimeSpan.FromMilliseconds(700));
                }

                child.Kill();
                child = null;
                kills++;
                driver.ThrowIfFailed();
            }

            // The last successor recovers and carries on; then everything still in flight must be answered.
            child = Child.Start(ourEnd, driverEnd, journal, server.UnixPath!);
            _ = child.WaitRelaying(expectNew: false, driver);
            child.WhileRelaying(() =>
            {
                driver.WaitForReplies(200, TimeSpan.FromSeconds(30));
                driver.StopAndDrain(TimeSpan.FromSeconds(30));
            });
            output.WriteLine($"{kills} kills ({startKills} while starting): {withPending} recoveries had requests unanswered, {cutReplies} finished a cut reply, {behindUnanswered} found several answered behind an unanswered one, {partialRequests} a request not received whole; the driver got {driver.Replies} replies ({driver.ReadBytes} bytes read, {driver.WrittenBytes} written)");
            foreach (string line in recoveries)
            {
                output.WriteLine(line);
            }

            Assert.True(Enough(), $"the kills did not land where the test needs them ({kills} kills, {withPending} with requests unanswered, {cutReplies} inside a reply, {behindUnanswered} with several answered behind an unanswered one, {partialRequests} inside a request)");
            Assert.True(server.Disk.AsSpan().SequenceEqual(driver.Model), "the server's disk is not what the driver wrote");
        }
        finally
        {
            child?.Kill();
            driver.Dispose();
            ourEnd.Dispose();
            journal.Dispose();
        }
    }

    /// <summary>
    /// The kernel's NBD_CMD_DISC was read and passed on, behind three reads the server never answered (nor closed), when
    /// the relay was killed: the
    /// successor must send the reads again and DISC behind them (not end at once, as a relay without a server does with a
    /// DISC), deliver the three replies, and only then end the driver's connection.
    /// </summary>
    [Fact(Timeout = 60_000)]
    public async Task Relay_KilledWithDiscInItsRing_SuccessorResendsTheReadsThenDiscAndDeliversEveryReply()
    {
        await using var server = new InMemoryNbdServer(1 << 20, index => index == 0 ? new ConnectionScript(AnswerFirst: 0, KeepOpenAfterDisc: true) : ConnectionScript.Normal);
        server.Fill(seed: 64);
        byte[] disk = server.Disk;
        (Socket ourEnd, Socket driverEnd) = RelayHarness.UnixPair();
        var journal = RelayJournal.Create(1 << 20);
        var driver = new Driver(driverEnd, disk, new Random(65));
        Child? child = null;
        try
        {
            child = Child.Start(ourEnd, driverEnd, journal, server.UnixPath!);
            Assert.Null(child.WaitRelaying(expectNew: true, driver));
            for (ulong i = 0; i < 3; i++)
            {
                driverEnd.Send(Request(CmdRead, 0x100 + i, i * 8192, 4096));
            }

            driverEnd.Send(Request(CmdDisc, 0, 0, 0));
            using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(20));
            ServerConnection first = await server.ConnectionAsync(0, deadline.Token);
            await Wait.UntilAsync(() => first.Requests.Count == 4, "the DISC at the first server", deadline.Token);
            child.Kill();

            // The successor's first connection comes 300 ms late: the DISC it reads meanwhile must wait for it.
            child = Child.Start(ourEnd, driverEnd, journal, server.UnixPath!, connectDelayMs: 300);
            RelayRecovery? recovered = child.WaitRelaying(expectNew: false, driver);
            Assert.Equal(3, recovered!.Pending);
            Assert.True(recovered.Parsed < recovered.Head, "the DISC was not left for the kernel thread");
            var answered = new HashSet<ulong>();
            driverEnd.ReceiveTimeout = 10_000;
            for (int i = 0; i < 3; i++)
            {
                byte[] header = new byte[SimpleReplyLength];
                ReceiveAll(driverEnd, header);
                RawReply reply = ParseReply(header);
                Assert.Equal(0u, reply.Error);
                Assert.True(answered.Add(reply.Cookie), $"cookie 0x{reply.Cookie:x} answered twice");
                byte[] data = new byte[4096];
                ReceiveAll(driverEnd, data);
                ulong index = reply.Cookie - 0x100;
                Assert.True(data.AsSpan().SequenceEqual(disk.AsSpan((int)index * 8192, 4096)), $"read {index} returned other data");
            }

            Assert.Equal(0, driverEnd.Receive(new byte[1])); // the relay ended the connection after the last reply
            ServerConnection second = await server.ConnectionAsync(1, deadline.Token);
            await Wait.UntilAsync(() => second.Requests.Count == 4, "the DISC at the second server", deadline.Token);
            Assert.Equal([CmdRead, CmdRead, CmdRead, CmdDisc], second.Requests.Select(r => r.Fields.Type));
        }
        finally
        {
            child?.Kill();
            driver.Dispose();
            ourEnd.Dispose();
            journal.Dispose();
        }
    }

    /// <summary>
    /// A request larger than the journal's ring: the relay carries it (its ring grows on the heap) and abandons the journal,
    /// which a successor then refuses with a reason, ending the driver's connection (the driver resends after its
    /// timeout, as without a journal).
    /// </summary>
    [Fact(Timeout = 30_000)]
    public async Task Journal_RequestLargerThanItsRing_AbandonedAndRefusedBySuccessor()
    {
        await using var server = new InMemoryNbdServer(1 << 20);
        (Socket ourEnd, Socket driverEnd) = RelayHarness.UnixPair();
        using var journal = RelayJournal.Create(4096);
        var events = new ConcurrentQueue<NbdRelayEvent>();
        var options = new NbdRelayOptions { Reconnect = _ => Task.FromResult(server.Connect()), Events = events.Enqueue };
        using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        using (driverEnd)
        using (var relay = NbdRelay.Journaled(Descriptors.Duplicate(ourEnd), Descriptors.Duplicate(driverEnd), RelayJournal.Open(new Microsoft.Win32.SafeHandles.SafeFileHandle(Descriptors.Dup((int)journal.File.DangerousGetHandle()), ownsHandle: true)), server.Connect(), options))
        {
            relay.Start();
            Assert.Equal(JournalState.Armed, journal.State);
            await WriteAsync(driverEnd, 0, Bytes(8192, seed: 66), cookie: 7, deadline.Token);
            Assert.Equal(JournalState.Abandoned, journal.State);
            Assert.Contains(events, e => e is NbdRelayJournalAbandoned a && a.Reason.Contains("8220 bytes", StringComparison.Ordinal));
            Assert.True(server.Disk.AsSpan(0, 8192).SequenceEqual(Bytes(8192, seed: 66)));

            var refused = Assert.Throws<InvalidDataException>(() => NbdRelay.Journaled(Descriptors.Duplicate(ourEnd), Descriptors.Duplicate(driverEnd), RelayJournal.Open(new Microsoft.Win32.SafeHandles.SafeFileHandle(Descriptors.Dup((int)journal.File.DangerousGetHandle()), ownsHandle: true)), null, options));
            Assert.Contains("abandoned", refused.Message, StringComparison.Ordinal);
            Assert.Equal(0, driverEnd.Receive(new byte[1])); // our end was shut down: the driver sees the connection end
        }

        ourEnd.Dispose();
    }

    /// <summary>
    /// A kill between an arm's setsockopt and its flip: the counter stands at the armed value with the spare slot ahead,
    /// which Position reads as the new base, and CompleteFlip makes the flip; a counter armed and untouched is left alone.
    /// </summary>
    [Fact]
    public void Counter_KilledBetweenArmAndFlip_PositionIsTheNewBaseAndCompleteFlipMakesIt()
    {
        (Socket reader, Socket writer) = RelayHarness.UnixPair();
        using (reader)
        using (writer)
        using (var journal = RelayJournal.Create(4096, rearmAfter: 1000))
        {
            RelayJournal.StreamCounter counter = journal.OurCounter;
            counter.Arm(reader, 0);
            counter.CompleteFlip(reader); // armed, nothing consumed: nothing to do
            Assert.Equal(0, counter.Base);
            writer.Send(new byte[3000]);
            ReceiveAll(reader, new byte[1500]);
            Assert.Equal(1500, counter.Position(reader));

            counter.Arm(reader, 1500, flip: false);
            Assert.Equal(0, counter.Base);
            Assert.Equal(1500, counter.Position(reader));
            counter.CompleteFlip(reader);
            Assert.Equal(1500, counter.Base);
            ReceiveAll(reader, new byte[700]);
            Assert.Equal(2200, counter.Position(reader));
            counter.CompleteFlip(reader); // no flip due
            Assert.Equal(1500, counter.Base);
        }
    }

    /// <summary>
    /// Recovery's clearing of stale marks: a mark behind the tail (left by a kill between the tail's store and the clear)
    /// goes, the marks of requests in [tail, parsed) stay, across the ring's wrap.
    /// </summary>
    [Fact]
    public void Marks_ClearedOutsideTheRequestsHeld_LiveMarksStayAcrossTheWrap()
    {
        using var journal = RelayJournal.Create(4096);
        const long Tail = 3000, Parsed = 6000; // requests held in [3000, 6000): offsets 3000..4095, then 0..1903
        long[] live = [3000, 3333, 4096, 5000, Parsed - 1];
        long[] stale = [Tail - 1, 2000, 1904]; // behind the tail, in the free offsets 1904..2999
        foreach (long position in live.Concat(stale))
        {
            journal.MarkDelivered(position);
        }

        journal.ClearDelivered(Parsed, Tail + 4096);
        Assert.All(live, p => Assert.True(journal.IsDelivered(p), $"the live mark at {p} was cleared"));
        Assert.All(stale, p => Assert.False(journal.IsDelivered(p), $"the stale mark at {p} stayed"));
        Assert.All(Enumerable.Range(0, 4096).Where(o => !live.Any(p => p % 4096 == o)), o => Assert.False(journal.IsDelivered(o), $"offset {o} is marked"));
    }

    private static void ReceiveAll(Socket socket, Span<byte> into)
    {
        while (!into.IsEmpty)
        {
            int n = socket.Receive(into);
            Assert.True(n > 0, "the connection ended inside a reply");
            into = into[n..];
        }
    }

    /// <summary>One relay process on duplicates of the three descriptors (the originals stay here, as in the fd store).</summary>
    private sealed class Child
    {
        private readonly Process _process;
        private readonly BlockingCollection<string> _lines = [];
        private int _killed;

        private Child(Process process)
        {
            _process = process;
        }

        /// <summary>What the child said it recovered (null: nothing yet, or a new journal).</summary>
        public string? RecoveredLine { get; private set; }

        public static Child Start(Socket ourEnd, Socket driverEnd, RelayJournal journal, string serverPath, int? connectDelayMs = null)
        {
            Child? started = null;
            ProcessLauncher.Start(() =>
            {
                started = StartOnLauncher(ourEnd, driverEnd, journal, serverPath, connectDelayMs);
                return started._process;
            });
            return started!;
        }

        /// <summary>
        /// On the launcher thread, which starts every child process of the tests: the duplicates, made without
        /// close-on-exec so that this child inherits them, exist only while no other test starts a process.
        /// </summary>
        private static Child StartOnLauncher(Socket ourEnd, Socket driverEnd, RelayJournal journal, string serverPath, int? connectDelayMs)
        {
            int[] fds = [Descriptors.Dup((int)ourEnd.Handle), Descriptors.Dup((int)driverEnd.Handle), Descriptors.Dup((int)journal.File.DangerousGetHandle())];
            try
            {
                var info = new ProcessStartInfo("dotnet", [ChildDll, "relay", .. fds.Select(fd => fd.ToString(CultureInfo.InvariantCulture)), serverPath])
                {
                    RedirectStandardOutput = true,
                    RedirectStandardError = true,
                };
                if (connectDelayMs is int delay)
                {
                    info.Environment["NBD_RELAY_CHILD_CONNECT_DELAY_MS"] = delay.ToString(CultureInfo.InvariantCulture);
                }

                var process = new Process { StartInfo = info };
                var child = new Child(process);
                process.OutputDataReceived += (_, e) =>
                {
                    if (e.Data is not null)
                    {
                        child._lines.Add(e.Data);
                    }
                };
                process.ErrorDataReceived += (_, e) =>
                {
                    if (e.Data is not null)
                    {
                        child._lines.Add("stderr: " + e.Data);
                    }
                };
                process.Start();
                process.BeginOutputReadLine();
                process.BeginErrorReadLine();
                return child;
            }
            finally
            {
                foreach (int fd in fds)
                {
                    Descriptors.Close(fd);
                }
            }
        }

        /// <summary>Runs <paramref name="check"/>; a failure also says what the child said meanwhile (it may have ended).</summary>
        public void WhileRelaying(Action check)
        {
            try
            {
                check();
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                var said = new List<string>();
                while (_lines.TryTake(out string? line))
                {
                    said.Add(line);
                }

                throw new Xunit.Sdk.XunitException(e.Message + (said.Count == 0 ? "" : " | the relay process said: " + string.Join(" | ", said)));
            }
        }

        /// <summary>Waits for RELAYING; returns what the child recovered (null: it started a new journal).</summary>
        public RelayRecovery? WaitRelaying(bool expectNew, Driver driver)
        {
            RelayRecovery? recovered = null;
            var said = new List<string>();
            var since = Stopwatch.StartNew();
            while (true)
            {
                // What the driver saw meanwhile (a recovery sends a cut reply's rest before it says anything) comes first.
                string? line;
                while (!_lines.TryTake(out line, TimeSpan.FromMilliseconds(100)))
                {
                    driver.ThrowIfFailed();
                    if (since.Elapsed > TimeSpan.FromSeconds(30))
                    {
                        Kill();
                        Assert.Fail("the relay process did not start relaying within 30 s: " + string.Join(" | ", said));
                    }
                }

                said.Add(line!);
                if (RecoveryLine.Parse(line!) is RelayRecovery found)
                {
                    RecoveredLine = line;
                    recovered = found;
                }
                else if (line == "RELAYING")
                {
                    Assert.Equal(expectNew, recovered is null);
                    return recovered;
                }
                else if (!line.StartsWith("stderr: ", StringComparison.Ordinal) || _process.HasExited)
                {
                    Kill();
                    Assert.Fail("the relay process did not relay: " + string.Join(" | ", said));
                }
            }
        }

        public void Kill()
        {
            if (Interlocked.Exchange(ref _killed, 1) != 0)
            {
                return;
            }

            using (_process)
            {
                if (!_process.HasExited)
                {
                    _process.Kill();
                }

                Assert.True(_process.WaitForExit(10_000), "the relay process did not die");
            }
        }
    }

    /// <summary>
    /// Plays the driver: up to 16 requests in flight (reads of 4–128 KiB, writes of 4–64 KiB, never two on a block at
    /// once, as the driver's users keep it), and a reader that checks every reply as it comes.
    /// </summary>
    private sealed class Driver(Socket socket, byte[] disk, Random random) : IDisposable
    {
        private readonly Lock _lock = new();
        private readonly Dictionary<ulong, (ushort Type, int Block, int Count)> _inFlight = [];
        private readonly bool[] _busy = new bool[Blocks];
        private readonly ConcurrentQueue<string> _failures = new();
        private readonly SemaphoreSlim _slots = new(MaxInFlight);
        private readonly CancellationTokenSource _stop = new();
        private Thread? _submitter;
        private Thread? _reader;
        private long _replies;
        private long _pausedUntil;
        private readonly Random _splits = new(67);
        private ulong _cookie = 0x1000;

        /// <summary>What the disk holds once every write is done.</summary>
        public byte[] Model { get; } = disk;

        public long Replies => Interlocked.Read(ref _replies);

        public long ReadBytes { get; private set; }

        public long WrittenBytes { get; private set; }

        public void Start()
        {
            _submitter = new Thread(Submit) { IsBackground = true, Name = "driver submit" };
            _reader = new Thread(Read) { IsBackground = true, Name = "driver read" };
            _submitter.Start();
            _reader.Start();
        }

        /// <summary>
        /// The reader starts no further receive for <paramref name="time"/> (it may be inside a reply); one already
        /// blocked still takes the next bytes that arrive.
        /// </summary>
        public void PauseReading(TimeSpan time) =>
            Interlocked.Exchange(ref _pausedUntil, Environment.TickCount64 + (long)time.TotalMilliseconds);

        public void ThrowIfFailed()
        {
            if (!_failures.IsEmpty)
            {
                Assert.Fail(string.Join("; ", _failures));
            }
        }

        public void WaitForReplies(long count, TimeSpan limit)
        {
            long target = Replies + count;
            var since = Stopwatch.StartNew();
            while (Replies < target)
            {
                ThrowIfFailed();
                Assert.True(since.Elapsed < limit, $"only {Replies - target + count} of {count} replies within {limit.TotalSeconds} s ({InFlight} in flight)");
                Thread.Sleep(2);
            }
        }

        /// <summary>Stops submitting and waits until every request in flight was answered.</summary>
        public void StopAndDrain(TimeSpan limit)
        {
            _stop.Cancel();
            _submitter!.Join();
            var since = Stopwatch.StartNew();
            while (InFlight > 0)
            {
                ThrowIfFailed();
                Assert.True(since.Elapsed < limit, $"{InFlight} requests still unanswered {limit.TotalSeconds} s after the last submit");
                Thread.Sleep(2);
            }

            ThrowIfFailed();
        }

        public void Dispose()
        {
            _stop.Cancel();
            socket.Dispose();
            _submitter?.Join();
            _reader?.Join();
        }

        private int InFlight
        {
            get
            {
                lock (_lock)
                {
                    return _inFlight.Count;
                }
            }
        }

        private void Submit()
        {
            try
            {
                while (!_stop.IsCancellationRequested)
                {
                    _slots.Wait(_stop.Token);
                    byte[] request = Next();

                    // Half the writes arrive in two pieces, 2 ms apart: kills also land inside a request not yet
                    // received whole.
                    int split = request.Length > RequestLength && _splits.Next(2) == 0 ? RequestLength + ((request.Length - RequestLength) / 2) : request.Length;
                    socket.Send(request.AsSpan(0, split));
                    if (split < request.Length)
                    {
                        Thread.Sleep(2);
                        socket.Send(request.AsSpan(split));
                    }
                }
            }
            catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
            {
            }
        }

        /// <summary>The next request, its blocks marked busy and in flight.</summary>
        private byte[] Next()
        {
            lock (_lock)
            {
                while (true)
                {
                    bool write = random.Next(2) == 0;
                    int count = write ? random.Next(1, 17) : random.Next(1, 33);
                    int block = random.Next(Blocks - count);
                    if (Enumerable.Range(block, count).Any(b => _busy[b]))
                    {
                        continue;
                    }

                    for (int b = block; b < block + count; b++)
                    {
                        _busy[b] = true;
                    }

                    ulong cookie = _cookie++;
                    _inFlight[cookie] = (write ? CmdWrite : CmdRead, block, count);
                    byte[] header = Request(write ? CmdWrite : CmdRead, cookie, (ulong)block * Block, (uint)(count * Block));
                    if (!write)
                    {
                        return header;
                    }

                    byte[] data = new byte[count * Block];
                    random.NextBytes(data);
                    data.CopyTo(Model, block * Block);
                    WrittenBytes += data.Length;
                    return [.. header, .. data];
                }
            }
        }

        private void Read()
        {
            var header = new byte[SimpleReplyLength];
            var data = new byte[32 * Block];
            var pause = new Random(64);
            try
            {
                while (true)
                {
                    ReceiveExactly(header);
                    RawReply reply = ParseReply(header);
                    if (reply.Magic != SimpleReplyMagic || reply.Error != 0)
                    {
                        throw new InvalidDataException($"reply {Replies + 1}: magic 0x{reply.Magic:x8}, error {reply.Error} (a cut reply's remains or a relay fault)");
                    }

                    (ushort Type, int Block, int Count) request;
                    lock (_lock)
                    {
                        if (!_inFlight.Remove(reply.Cookie, out request))
                        {
                            throw new InvalidDataException($"reply {Replies + 1}: cookie 0x{reply.Cookie:x16} is not in flight (answered twice, or never sent)");
                        }
                    }

                    if (request.Type == CmdRead)
                    {
                        // Now and then the driver is slow to take the data: the relay's send of it blocks.
                        if (pause.Next(8) == 0)
                        {
                            Thread.Sleep(1);
                        }

                        Span<byte> got = data.AsSpan(0, request.Count * Block);
                        ReceiveExactly(got);
                        lock (_lock)
                        {
                            if (!got.SequenceEqual(Model.AsSpan(request.Block * Block, got.Length)))
                            {
                                throw new InvalidDataException($"reply {Replies + 1}: the read of blocks {request.Block}+{request.Count} (cookie 0x{reply.Cookie:x16}) returned other data");
                            }

                            ReadBytes += got.Length;
                        }
                    }

                    lock (_lock)
                    {
                        for (int b = request.Block; b < request.Block + request.Count; b++)
                        {
                            _busy[b] = false;
                        }
                    }

                    Interlocked.Increment(ref _replies);
                    _slots.Release();
                }
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException && _stop.IsCancellationRequested)
            {
            }
            catch (Exception e)
            {
                _failures.Enqueue(e.Message);
            }
        }

        private void ReceiveExactly(Span<byte> into)
        {
            while (!into.IsEmpty)
            {
                long wait = Interlocked.Read(ref _pausedUntil) - Environment.TickCount64;
                if (wait > 0)
                {
                    Thread.Sleep((int)wait);
                }

                int n = socket.Receive(into);
                if (n == 0)
                {
                    throw new EndOfStreamException("the relay closed the driver's connection");
                }

                into = into[n..];
            }
        }
    }
}

using System.Diagnostics;
using Microsoft.Extensions.Time.Testing;
using Nbd.Protocol;

namespace Nbd.Fuzz;

internal sealed record FuzzSettings
{
    public ulong Seed { get; init; } = 1;

    /// <summary>Number of cases = number of hostile streams (<see cref="CaseGenerator"/> adds valid ones around some).</summary>
    public long Cases { get; init; } = 10_000;

    public long StartIndex { get; init; }

    public FuzzMode Mode { get; init; } = FuzzMode.All;

    public int Parallel { get; init; } = Environment.ProcessorCount;

    /// <summary>A case still running after this long is a hang (in-memory cases take microseconds).</summary>
    public TimeSpan Deadline { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>Most bytes one handshake may allocate; the client's largest legitimate buffer is a 64 KiB reply.</summary>
    public long AllocationBound { get; init; } = 1024 * 1024;

    /// <summary>Every n-th reconnect case (index % n == n - 1) is replayed over real loopback TCP through NbdClient.ConnectAsync; 0 = never.</summary>
    public int SocketEvery { get; init; } = 1000;

    public int MaxFindings { get; init; } = 50;

    /// <summary>Relay mode: most live heap the process may keep after a run (pools keep some buffers by design).</summary>
    public long HeapGrowthBound { get; init; } = 64L * 1024 * 1024;

    /// <summary>Relay mode: how the valid server answers the resent requests (sequential is the stricter one).</summary>
    public RelayOracle Oracle { get; init; } = RelayOracle.Sequential;

    /// <summary>The client's handshake timeout, on the fake clock a stalled server advances.</summary>
    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(10);
}

internal enum FindingKind
{
    /// <summary>The client threw something other than an NbdException.</summary>
    UnexpectedException,
    /// <summary>A case ran past the deadline.</summary>
    Hang,
    /// <summary>One handshake allocated more than the bound.</summary>
    AllocationOverBound,
    /// <summary>An unmutated corpus stream did not give its expected outcome (or a timeout came without a stall).</summary>
    OracleMismatch,
    /// <summary>The same stream gave another outcome over a real loopback socket than in memory.</summary>
    SocketMismatch,
    /// <summary>Relay: the kernel received a reply that is not a simple reply to a cookie in flight, or bytes after the last one.</summary>
    MalformedReply,
    /// <summary>Relay: the kernel's end closed before every request had its reply.</summary>
    MissingReply,
    /// <summary>Relay: a second reply for one request reached the kernel.</summary>
    DuplicateReply,
    /// <summary>Relay: a reply from the valid server reached the kernel with other data or an error.</summary>
    WrongData,
    /// <summary>Relay: a server received a request (or write data) other than the kernel's, twice, or out of order.</summary>
    BadForward,
    /// <summary>Relay: the relay ended (Completion) before its owner disposed it.</summary>
    RelayEnded,
    /// <summary>Relay: the relay dropped the valid server's connection.</summary>
    ValidServerDropped,
    /// <summary>An exception no one caught on any thread (the process ends after reporting it).</summary>
    Crash,
    /// <summary>Relay: the process kept file descriptors or heap after the run.</summary>
    ResourceGrowth,
}

/// <summary>A check a case failed; ReplayOptions is what --replay needs besides the id (" --mode relay").</summary>
internal sealed record Finding(FindingKind Kind, string CaseId, int Stream, string Detail, string ReplayOptions = "")
{
    public override string ToString() => $"{Kind} case {CaseId} stream {Stream}: {Detail} (replay: --replay {CaseId}{ReplayOptions})";
}

/// <summary>The measured result of one handshake over one in-memory stream.</summary>
internal sealed record StreamResult(string Outcome, bool Documented, long Allocated, TimeSpan Duration, bool CompletedSynchronously, Exception? Exception);

internal sealed class FuzzReport
{
    public long Cases { get; set; }
    public long Streams { get; set; }
    public long Successes { get; set; }
    public SortedDictionary<string, long> Failures { get; } = new(StringComparer.Ordinal);
    public long MaxAllocated { get; set; }
    public string MaxAllocatedCase { get; set; } = "-";
    public TimeSpan MaxDuration { get; set; }
    public string MaxDurationCase { get; set; } = "-";
    public long AsyncCompletions { get; set; }
    public long OracleChecks { get; set; }
    public long Hostile { get; set; }
    public long SocketStreams { get; set; }
    public long PeakGcHeapBytes { get; set; }
    public long PeakWorkingSetBytes { get; set; }
    public TimeSpan Elapsed { get; set; }
    public List<Finding> Findings { get; } = [];
    public bool Aborted { get; set; }
}

/// <summary>
/// Serves generated server streams to the handshake code on <see cref="FuzzSettings.Parallel"/> threads and checks
/// each: it ends, with success or an NbdException; unmutated streams give exactly their expected outcome; no
/// handshake allocates more than the bound. A watchdog thread flags any case older than the deadline as a hang
/// (a synchronous loop cannot be interrupted, so the run stops there) and samples the GC heap.
/// </summary>
internal sealed class FuzzEngine
{
    private static readonly NbdUri PlainUri = NbdUri.Parse($"nbd://fuzz/{Corpus.ExportName}");
    private static readonly NbdUri TlsUri = NbdUri.Parse($"nbds://fuzz/{Corpus.ExportName}");

    private readonly FuzzSettings _settings;
    private readonly HandshakeTarget _target;
    private readonly Action<string>? _progress;
    private readonly Lock _findingsLock = new();
    private readonly List<Finding> _findings = [];
    private readonly ManualResetEventSlim _done = new();
    private volatile bool _stop;

    public FuzzEngine(FuzzSettings settings, HandshakeTarget? target = null, Action<string>? progress = null)
    {
        _settings = settings;
        _target = target ?? NbdClientTarget.Instance;
        _progress = progress;
    }

    public FuzzReport Run()
    {
        int parallel = Math.Max(1, _settings.Parallel);
        var workers = new Worker[parallel];
        var threads = new Thread[parallel];
        int running = parallel;
        var clock = Stopwatch.StartNew();
        for (int w = 0; w < parallel; w++)
        {
            var worker = workers[w] = new Worker(this, w, parallel);
            threads[w] = new Thread(() =>
            {
                worker.Loop();
                if (Interlocked.Decrement(ref running) == 0)
                {
                    _done.Set();
                }
            })
            { IsBackground = true, Name = $"fuzz-{w}" };
        }

        var report = new FuzzReport();
        var watchdog = new Thread(() => Watch(workers, report)) { IsBackground = true, Name = "fuzz-watchdog" };
        foreach (var thread in threads)
        {
            thread.Start();
        }

        watchdog.Start();
        _done.Wait();
        _stop = true;
        watchdog.Join();
        report.Elapsed = clock.Elapsed;

        foreach (var w in workers)
        {
            w.MergeInto(report);
        }

        lock (_findingsLock)
        {
            report.Findings.AddRange(_findings);
        }

        report.Aborted = report.Findings.Exists(f => f.Kind == FindingKind.Hang);
        report.PeakWorkingSetBytes = Process.GetCurrentProcess().PeakWorkingSet64;
        return report;
    }

    // ---- One case -----------------------------------------------------------------------------------------------

    /// <summary>Runs one handshake over one in-memory stream and measures it; never throws for the client's failures.</summary>
    public static StreamResult RunStream(HandshakeTarget target, FuzzOperation operation, bool tls, NbdClientOptions options, FakeTimeProvider clock, ServedStream served)
    {
        var stream = new FuzzStream(served.Bytes, served.MaxChunk, served.Stall ? clock : null, options.HandshakeTimeout);
        var uri = tls ? TlsUri : PlainUri;
        long before = GC.GetAllocatedBytesForCurrentThread();
        long started = Stopwatch.GetTimestamp();
        Task task;
        try
        {
            task = target(operation, stream, uri, options);
        }
        catch (Exception ex)
        {
            task = Task.FromException(ex);
        }

        bool synchronous = task.IsCompleted;
        if (!synchronous)
        {
            // Only a broken stream or client gets here; a task that never ends is the watchdog's to report.
            ((IAsyncResult)task).AsyncWaitHandle.WaitOne();
        }

        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        var duration = Stopwatch.GetElapsedTime(started);
        if (task.IsFaulted)
        {
            var ex = task.Exception!.InnerException!;
            return new StreamResult(Outcome.Of(ex), ex is NbdException, allocated, duration, synchronous, ex);
        }

        if (task.IsCanceled)
        {
            return new StreamResult("canceled task", false, allocated, duration, synchronous, null);
        }

        object? result = task switch
        {
            Task<NbdExportInfo> e => e.Result,
            Task<IReadOnlyList<NbdExportListing>> l => l.Result,
            _ => null,
        };
        return new StreamResult(Outcome.OfResult(result), true, allocated, duration, synchronous, null);
    }

    /// <summary>One client configuration per case: the reconnect path reuses URI, options and clock.</summary>
    public static (NbdClientOptions Options, FakeTimeProvider Clock) ClientConfiguration(TimeSpan handshakeTimeout)
    {
        var clock = new FakeTimeProvider();
        return (new NbdClientOptions { HandshakeTimeout = handshakeTimeout, TimeProvider = clock }, clock);
    }

    /// <summary>The checks every stream must pass; findings for those it fails.</summary>
    public static IEnumerable<Finding> Check(FuzzCase c, int index, ServedStream served, StreamResult result, long allocationBound)
    {
        if (!result.Documented)
        {
            yield return new Finding(FindingKind.UnexpectedException, c.Id, index, result.Exception?.ToString() ?? result.Outcome);
        }

        if (served.Expected is not null && result.Outcome != served.Expected)
        {
            yield return new Finding(FindingKind.OracleMismatch, c.Id, index, $"expected '{served.Expected}', got '{result.Outcome}'");
        }
        else if (!served.Stall && result.Exception is NbdTimeoutException)
        {
            yield return new Finding(FindingKind.OracleMismatch, c.Id, index, "handshake timed out although the server closed instead of stalling");
        }

        if (result.Allocated > allocationBound)
        {
            yield return new Finding(FindingKind.AllocationOverBound, c.Id, index, $"{result.Allocated} bytes allocated (bound {allocationBound}); outcome {result.Outcome}");
        }
    }

    private void Report(Finding finding)
    {
        lock (_findingsLock)
        {
            if (_findings.Count < _settings.MaxFindings)
            {
                _findings.Add(finding);
                _progress?.Invoke($"FINDING {finding}");
            }
        }
    }

    // ---- Watchdog -----------------------------------------------------------------------------------------------

    private void Watch(Worker[] workers, FuzzReport report)
    {
        long deadlineTicks = (long)(_settings.Deadline.TotalSeconds * Stopwatch.Frequency);
        long nextProgress = Stopwatch.GetTimestamp() + (10 * Stopwatch.Frequency);
        while (!_stop)
        {
            _done.Wait(20);
            long now = Stopwatch.GetTimestamp();
            foreach (var w in workers)
            {
                long started = Volatile.Read(ref w.CaseStarted);
                long index = Volatile.Read(ref w.CaseIndex);
                if (started != 0 && now - started > deadlineTicks && !_stop)
                {
                    Report(new Finding(FindingKind.Hang, $"{_settings.Seed}:{index}", -1,
                        $"case still running after {_settings.Deadline.TotalMilliseconds:0} ms on thread {w.Id}"));
                    _stop = true;
                    _done.Set();
                }
            }

            report.PeakGcHeapBytes = Math.Max(report.PeakGcHeapBytes, GC.GetTotalMemory(forceFullCollection: false));
            if (_progress is not null && now > nextProgress)
            {
                nextProgress = now + (10 * Stopwatch.Frequency);
                long done = workers.Sum(x => Volatile.Read(ref x.CasesDone));
                _progress($"progress {done}/{_settings.Cases} cases");
            }
        }
    }

    private sealed class Worker(FuzzEngine engine, int id, int stride)
    {
        public long CaseStarted;
        public long CaseIndex;
        public long CasesDone;

        private readonly FuzzReport _stats = new();

        public int Id => id;

        public void Loop()
        {
            var settings = engine._settings;
            long end = settings.StartIndex + settings.Cases;
            for (long index = settings.StartIndex + id; index < end && !engine._stop; index += stride)
            {
                var c = CaseGenerator.Build(settings.Seed, index, settings.Mode);
                Volatile.Write(ref CaseIndex, index);
                Volatile.Write(ref CaseStarted, Stopwatch.GetTimestamp());
                RunCase(c);
                Volatile.Write(ref CaseStarted, 0);
                Volatile.Write(ref CasesDone, CasesDone + 1);
            }
        }

        private void RunCase(FuzzCase c)
        {
            var settings = engine._settings;
            var (options, clock) = ClientConfiguration(settings.HandshakeTimeout);
            long started = Stopwatch.GetTimestamp();
            var outcomes = new string[c.Streams.Length];
            for (int i = 0; i < c.Streams.Length; i++)
            {
                var served = c.Streams[i];
                var result = RunStream(engine._target, c.Operation, c.Tls, options, clock, served);
                outcomes[i] = result.Outcome;
                Count(c, served, result);
                foreach (var finding in Check(c, i, served, result, settings.AllocationBound))
                {
                    engine.Report(finding);
                }
            }

            if (c.Reconnect && settings.SocketEvery > 0 && c.Index % settings.SocketEvery == settings.SocketEvery - 1)
            {
                foreach (var finding in LoopbackReplay.Compare(c, outcomes, settings.Deadline))
                {
                    engine.Report(finding);
                }

                _stats.SocketStreams += c.Streams.Count(s => !s.Stall);
            }

            var duration = Stopwatch.GetElapsedTime(started);
            if (duration > _stats.MaxDuration)
            {
                _stats.MaxDuration = duration;
                _stats.MaxDurationCase = c.Id;
            }

            _stats.Cases++;
        }

        private void Count(FuzzCase c, ServedStream served, StreamResult result)
        {
            _stats.Streams++;
            if (Outcome.IsSuccess(result.Outcome))
            {
                _stats.Successes++;
            }
            else
            {
                string key = Outcome.Category(result.Outcome);
                _stats.Failures[key] = _stats.Failures.GetValueOrDefault(key) + 1;
            }

            if (served.Expected is not null)
            {
                _stats.OracleChecks++;
            }
            else
            {
                _stats.Hostile++;
            }

            if (!result.CompletedSynchronously)
            {
                _stats.AsyncCompletions++;
            }

            if (result.Allocated > _stats.MaxAllocated)
            {
                _stats.MaxAllocated = result.Allocated;
                _stats.MaxAllocatedCase = c.Id;
            }
        }

        public void MergeInto(FuzzReport report)
        {
            report.Cases += _stats.Cases;
            report.Streams += _stats.Streams;
            report.Successes += _stats.Successes;
            report.OracleChecks += _stats.OracleChecks;
            report.Hostile += _stats.Hostile;
            report.AsyncCompletions += _stats.AsyncCompletions;
            report.SocketStreams += _stats.SocketStreams;
            foreach (var (key, count) in _stats.Failures)
            {
                report.Failures[key] = report.Failures.GetValueOrDefault(key) + count;
            }

            if (_stats.MaxAllocated > report.MaxAllocated)
            {
                report.MaxAllocated = _stats.MaxAllocated;
                report.MaxAllocatedCase = _stats.MaxAllocatedCase;
            }

            if (_stats.MaxDuration > report.MaxDuration)
            {
                report.MaxDuration = _stats.MaxDuration;
                report.MaxDurationCase = _stats.MaxDurationCase;
            }
        }
    }
}

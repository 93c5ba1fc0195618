using System.Diagnostics;
using System.Globalization;

namespace Nbd.Fuzz;

internal sealed class RelayReport
{
    public long Cases { get; set; }
    public long Requests { get; set; }
    public long FromHostile { get; set; }
    public long HostileErrors { get; set; }
    public long FromValid { get; set; }
    public long Reconnects { get; set; }
    public SortedDictionary<string, long> Lost { get; } = new(StringComparer.Ordinal);
    public long MaxAllocated { get; set; }
    public string MaxAllocatedCase { get; set; } = "-";
    public long MaxAllocatedBound { get; set; }
    public TimeSpan MaxDuration { get; set; }
    public string MaxDurationCase { get; set; } = "-";
    public long PeakGcHeapBytes { get; set; }
    public long PeakWorkingSetBytes { get; set; }
    public long HeapGrowthBytes { get; set; }
    public int DescriptorGrowth { get; set; }
    public TimeSpan Elapsed { get; set; }
    public int[] Collections { get; } = new int[3];
    public List<Finding> Findings { get; } = [];
    public bool Aborted { get; set; }
}

/// <summary>
/// <c>--mode relay</c>: runs <see cref="RelayHarness"/> cases on <see cref="FuzzSettings.Parallel"/> threads. Each case
/// checks itself (replies, forwarding, allocation of the relay's server thread); the engine adds a watchdog (a case
/// older than 3 × the deadline + 1 s stops the run as a hang: every socket wait inside a case already gives up after
/// the deadline), an UnhandledException hook that names the case by thread name before the process ends, and the
/// process's heap and descriptor counts before and after the run.
/// </summary>
internal sealed class RelayEngine(FuzzSettings settings, Action<string>? progress = null)
{
    private readonly FuzzSettings _settings = settings;
    private readonly Lock _findingsLock = new();
    private readonly List<Finding> _findings = [];
    private readonly ManualResetEventSlim _done = new();
    private volatile bool _stop;

    public RelayReport Run()
    {
        int parallel = Math.Max(1, _settings.Parallel);
        var report = new RelayReport();
        var workers = new Worker[parallel];
        UnhandledExceptionEventHandler crash = (_, e) =>
        {
            // Runs on the dying thread: the relay's threads are named "fuzz-relay SEED:INDEX k|s", the harness's
            // "fuzz-server SEED:INDEX"; a worker names its current case.
            string name = Thread.CurrentThread.Name ?? "?";
            string id = name.StartsWith("fuzz-relay ", StringComparison.Ordinal) || name.StartsWith("fuzz-server ", StringComparison.Ordinal)
                ? name.Split(' ')[1]
                : Array.Find(workers, w => w?.Thread == Thread.CurrentThread) is { } worker
                    ? string.Create(CultureInfo.InvariantCulture, $"{_settings.Seed}:{Volatile.Read(ref worker.CaseIndex)}")
                    : name;
            var finding = new Finding(FindingKind.Crash, id, -1, $"on thread '{name}': {e.ExceptionObject}", ReplayOptions(_settings.Oracle));
            Report(finding);
            if (progress is null)
            {
                Console.Error.WriteLine($"FINDING {finding}");
            }
        };
        AppDomain.CurrentDomain.UnhandledException += crash;
        try
        {
            // The runtime opens descriptors lazily on first use (about 20 here): one uncounted case first, so the
            // count after the run compares like with like.
            RelayHarness.Run(RelayCaseGenerator.Build(0, 0), _settings.Deadline);
            (long heapBefore, int fdsBefore) = Resources();
            var threads = new Thread[parallel];
            int running = parallel;
            int[] collections = [GC.CollectionCount(0), GC.CollectionCount(1), GC.CollectionCount(2)];
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
                { IsBackground = true, Name = $"fuzz-relay-worker-{w}" };
                worker.Thread = threads[w];
            }

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
            for (int g = 0; g < 3; g++)
            {
                report.Collections[g] = GC.CollectionCount(g) - collections[g];
            }

            foreach (var w in workers)
            {
                w.MergeInto(report);
            }

            (long heapAfter, int fdsAfter) = Resources();
            report.HeapGrowthBytes = heapAfter - heapBefore;
            report.DescriptorGrowth = fdsAfter - fdsBefore;

            // Pools keep buffers by design (a few per size and core); a leak per case grows with the count.
            if (report.DescriptorGrowth > 16)
            {
                Report(new Finding(FindingKind.ResourceGrowth, $"{_settings.Seed}:*", -1, $"{report.DescriptorGrowth} more open descriptors after the run"));
            }

            if (report.HeapGrowthBytes > _settings.HeapGrowthBound)
            {
                Report(new Finding(FindingKind.ResourceGrowth, $"{_settings.Seed}:*", -1, $"{report.HeapGrowthBytes} B more live heap after the run (bound {_settings.HeapGrowthBound})"));
            }
        }
        finally
        {
            AppDomain.CurrentDomain.UnhandledException -= crash;
        }

        lock (_findingsLock)
        {
            report.Findings.AddRange(_findings);
        }

        report.Aborted = report.Findings.Exists(f => f.Kind == FindingKind.Hang && f.Stream == -1);
        report.PeakWorkingSetBytes = Process.GetCurrentProcess().PeakWorkingSet64;
        return report;
    }

    /// <summary>Live heap after a full collection, and open descriptors.</summary>
    private static (long Heap, int Descriptors) Resources()
    {
        long heap = GC.GetTotalMemory(forceFullCollection: true);
        int fds = Directory.Exists("/proc/self/fd") ? Directory.GetFiles("/proc/self/fd").Length : 0;
        return (heap, fds);
    }

    /// <summary>The findings of one finished case, each with its replay id.</summary>
    public static IEnumerable<Finding> Findings(RelayCase c, RelayCaseResult result, RelayOracle oracle) =>
        result.Problems.Select(p => new Finding(p.Kind, c.Id, 0, p.Detail, ReplayOptions(oracle)));

    public static string OracleText(RelayOracle oracle) =>
        oracle == RelayOracle.Disconnect ? "NBD_CMD_DISC after the requests, no valid server" : oracle.ToString().ToLowerInvariant() + " valid server";

    public static string ReplayOptions(RelayOracle oracle) =>
        oracle == RelayOracle.Sequential ? " --mode relay" : " --mode relay --oracle " + oracle.ToString().ToLowerInvariant();

    private void Report(Finding finding)
    {
        lock (_findingsLock)
        {
            if (_findings.Count < _settings.MaxFindings)
            {
                _findings.Add(finding);
                progress?.Invoke($"FINDING {finding}");
            }
        }
    }

    private void Watch(Worker[] workers, RelayReport report)
    {
        long deadlineTicks = (long)(((3 * _settings.Deadline.TotalSeconds) + 1) * Stopwatch.Frequency);
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
                        $"case still running after {deadlineTicks / Stopwatch.Frequency} s on worker {w.Id}", ReplayOptions(_settings.Oracle)));
                    _stop = true;
                    _done.Set();
                }
            }

            report.PeakGcHeapBytes = Math.Max(report.PeakGcHeapBytes, GC.GetTotalMemory(forceFullCollection: false));
            if (progress is not null && now > nextProgress)
            {
                nextProgress = now + (10 * Stopwatch.Frequency);
                long done = workers.Sum(x => Volatile.Read(ref x.CasesDone));
                progress(string.Create(CultureInfo.InvariantCulture, $"progress {done}/{_settings.Cases} cases"));
            }
        }
    }

    private sealed class Worker(RelayEngine engine, int id, int stride)
    {
        public long CaseStarted;
        public long CaseIndex;
        public long CasesDone;

        private readonly RelayReport _stats = new();

        public Thread? Thread { get; set; }

        public int Id => id;

        public void Loop()
        {
            var settings = engine._settings;
            long end = settings.StartIndex + settings.Cases;
            for (long index = settings.StartIndex + id; index < end && !engine._stop; index += stride)
            {
                Volatile.Write(ref CaseIndex, index);
                Volatile.Write(ref CaseStarted, Stopwatch.GetTimestamp());
                var c = RelayCaseGenerator.Build(settings.Seed, index);
                var result = RelayHarness.Run(c, settings.Deadline, settings.Oracle);
                Volatile.Write(ref CaseStarted, 0);
                Count(c, result);
                foreach (var finding in Findings(c, result, settings.Oracle))
                {
                    engine.Report(finding);
                }

                Volatile.Write(ref CasesDone, CasesDone + 1);
            }
        }

        private void Count(RelayCase c, RelayCaseResult result)
        {
            _stats.Cases++;
            _stats.Requests += c.Requests.Length;
            _stats.FromHostile += result.FromHostile;
            _stats.HostileErrors += result.HostileErrors;
            _stats.FromValid += result.FromValid;
            _stats.Reconnects += result.Reconnects;
            _stats.Lost[result.Lost] = _stats.Lost.GetValueOrDefault(result.Lost) + 1;
            if (result.HostileAllocated > _stats.MaxAllocated)
            {
                _stats.MaxAllocated = result.HostileAllocated;
                _stats.MaxAllocatedCase = c.Id;
                _stats.MaxAllocatedBound = result.AllocationBound;
            }

            if (result.Duration > _stats.MaxDuration)
            {
                _stats.MaxDuration = result.Duration;
                _stats.MaxDurationCase = c.Id;
            }
        }

        public void MergeInto(RelayReport report)
        {
            report.Cases += _stats.Cases;
            report.Requests += _stats.Requests;
            report.FromHostile += _stats.FromHostile;
            report.HostileErrors += _stats.HostileErrors;
            report.FromValid += _stats.FromValid;
            report.Reconnects += _stats.Reconnects;
            foreach (var (key, count) in _stats.Lost)
            {
                report.Lost[key] = report.Lost.GetValueOrDefault(key) + count;
            }

            if (_stats.MaxAllocated > report.MaxAllocated)
            {
                report.MaxAllocated = _stats.MaxAllocated;
                report.MaxAllocatedCase = _stats.MaxAllocatedCase;
                report.MaxAllocatedBound = _stats.MaxAllocatedBound;
            }

            if (_stats.MaxDuration > report.MaxDuration)
            {
                report.MaxDuration = _stats.MaxDuration;
                report.MaxDurationCase = _stats.MaxDurationCase;
            }
        }
    }

    public static void Print(RelayReport r, FuzzSettings settings, TextWriter o)
    {
        var c = CultureInfo.InvariantCulture;
        o.WriteLine(string.Create(c, $"cases            {r.Cases}{(r.Aborted ? " (run stopped at a hang)" : "")}: {r.Cases} hostile first servers, {r.Requests} requests"));
        o.WriteLine(string.Create(c, $"replies          {r.FromHostile} forwarded from the hostile server ({r.HostileErrors} errors), {r.FromValid} from the valid server after {r.Reconnects} reconnects"));
        o.WriteLine("hostile connection dropped because");
        foreach (var (reason, count) in r.Lost.OrderByDescending(kv => kv.Value))
        {
            o.WriteLine(string.Create(c, $"  {count,10}  {reason}"));
        }

        o.WriteLine(string.Create(c, $"max allocation   {r.MaxAllocated} B by the relay's server thread on one hostile connection (case {r.MaxAllocatedCase}; its bound {r.MaxAllocatedBound} B)"));
        o.WriteLine(string.Create(c, $"max duration     {r.MaxDuration.TotalMilliseconds:0.###} ms per case (case {r.MaxDurationCase}; deadline {settings.Deadline.TotalMilliseconds:0} ms)"));
        o.WriteLine(string.Create(c, $"peak GC heap     {r.PeakGcHeapBytes / (1024.0 * 1024):0.0} MiB (sampled every 20 ms)"));
        o.WriteLine(string.Create(c, $"peak RSS         {r.PeakWorkingSetBytes / (1024.0 * 1024):0.0} MiB"));
        o.WriteLine(string.Create(c, $"collections      gen0 {r.Collections[0]}, gen1 {r.Collections[1]}, gen2 {r.Collections[2]}"));
        o.WriteLine(string.Create(c, $"after the run    live heap {r.HeapGrowthBytes / 1024.0:+0;-0} KiB, open descriptors {r.DescriptorGrowth:+0;-0;0}"));
        o.WriteLine(string.Create(c, $"wall time        {r.Elapsed.TotalSeconds:0.0} s, {r.Cases / Math.Max(r.Elapsed.TotalSeconds, 1e-9):0} cases/s"));
        o.WriteLine(string.Create(c, $"findings         {r.Findings.Count}"));
        foreach (var f in r.Findings)
        {
            o.WriteLine($"  {f}");
        }
    }
}

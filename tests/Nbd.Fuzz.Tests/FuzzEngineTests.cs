using Nbd.Protocol;

namespace Nbd.Fuzz.Tests;

/// <summary>The engine at CI size against the real client, and proof that each of its checks can fail.</summary>
public sealed class FuzzEngineTests
{
    private const long CiCases = 20_000;

    [Fact]
    public void Run_CiSampleOfBothModes_NoFindingAndAllocationBelowBound()
    {
        var settings = new FuzzSettings { Seed = 20251125, Cases = CiCases, Mode = FuzzMode.All, Parallel = 2, SocketEvery = 500 };

        var report = new FuzzEngine(settings).Run();

        Assert.True(report.Findings.Count == 0, string.Join("\n", report.Findings));
        Assert.Equal(CiCases, report.Cases);
        Assert.Equal(CiCases, report.Hostile); // one hostile stream per case
        Assert.Equal(report.Streams, report.Hostile + report.OracleChecks);
        Assert.InRange(report.MaxAllocated, 1, settings.AllocationBound);
        Assert.Equal(0, report.AsyncCompletions);
        Assert.True(report.Elapsed < TimeSpan.FromSeconds(60), $"took {report.Elapsed}");

        // The generator must reach every kind of outcome, or the run proves little.
        string failures = string.Join(", ", report.Failures.Select(kv => $"{kv.Key}={kv.Value}"));
        Assert.True(report.Successes > report.Streams / 10, $"{report.Successes} successes; {failures}");
        Assert.True(report.OracleChecks > report.Streams / 10, $"{report.OracleChecks} exact checks");
        Assert.True(report.SocketStreams > 0, "no case went over loopback TCP");
        foreach (string outcome in new[]
        {
            "NbdProtocolException:BadMagic", "NbdProtocolException:Truncated", "NbdProtocolException:OversizedLength",
            "NbdProtocolException:UnexpectedReply", "NbdProtocolException:InvalidValue", "NbdProtocolException:Unsupported",
            "NbdServerErrorException", "NbdTlsRequiredException", "NbdTimeoutException:Handshake",
            "NbdTlsNotSupportedException:accepted=True", "NbdTlsNotSupportedException:accepted=False",
        })
        {
            Assert.True(report.Failures.GetValueOrDefault(outcome) > 0, $"never saw {outcome}: {failures}");
        }
    }

    [Fact]
    public void Run_HandshakeThatNeverReturns_WatchdogReportsHangWithSeedAndIndex()
    {
        using var never = new ManualResetEventSlim();
        HandshakeTarget target = (op, stream, uri, options) =>
        {
            // The 8th handshake blocks its thread for good, as an endless parser loop would.
            if (stream is FuzzStream && Interlocked.Increment(ref _calls) == 8)
            {
                never.Wait();
            }

            return Task.CompletedTask;
        };
        var settings = new FuzzSettings { Seed = 42, Cases = 1000, Mode = FuzzMode.Handshake, Parallel = 1, Deadline = TimeSpan.FromSeconds(1) };

        var started = DateTime.UtcNow;
        FuzzReport report;
        try
        {
            report = new FuzzEngine(settings, target).Run();
        }
        finally
        {
            never.Set();
        }

        var hang = Assert.Single(report.Findings);
        Assert.Equal(FindingKind.Hang, hang.Kind);
        long index = CaseOfCall(42, 8);
        Assert.Equal($"42:{index}", hang.CaseId);
        Assert.True(report.Aborted);
        Assert.Equal(index, report.Cases);
        Assert.True(DateTime.UtcNow - started < TimeSpan.FromSeconds(10));
    }

    private int _calls;

    /// <summary>The case whose streams include the <paramref name="call"/>-th handshake of a one-thread run.</summary>
    private static long CaseOfCall(ulong seed, int call)
    {
        for (long index = 0, calls = 0; ; index++)
        {
            calls += CaseGenerator.Build(seed, index, FuzzMode.Handshake).Streams.Length;
            if (calls >= call)
            {
                return index;
            }
        }
    }

    [Fact]
    public void Run_TaskThatNeverCompletes_WatchdogReportsHang()
    {
        var pending = new TaskCompletionSource();
        HandshakeTarget target = (op, stream, uri, options) => Interlocked.Increment(ref _calls) == 3 ? pending.Task : Task.CompletedTask;
        var settings = new FuzzSettings { Seed = 5, Cases = 100, Mode = FuzzMode.Handshake, Parallel = 1, Deadline = TimeSpan.FromSeconds(1) };

        var report = new FuzzEngine(settings, target).Run();
        pending.SetResult();

        var hang = Assert.Single(report.Findings);
        Assert.Equal(FindingKind.Hang, hang.Kind);
        Assert.Equal($"5:{CaseOfCall(5, 3)}", hang.CaseId);
    }

    [Fact]
    public void Run_TargetThrowsUndocumentedType_Finding()
    {
        HandshakeTarget target = (op, stream, uri, options) => Task.FromException(new IndexOutOfRangeException("parser bug"));

        var report = new FuzzEngine(new FuzzSettings { Seed = 1, Cases = 10, Mode = FuzzMode.Handshake, Parallel = 1, MaxFindings = 100 }, target).Run();

        Assert.Equal(report.Streams, report.Findings.Count(f => f.Kind == FindingKind.UnexpectedException));
        Assert.True(report.Streams >= 10);
        Assert.Contains("IndexOutOfRangeException", report.Findings[0].Detail, StringComparison.Ordinal);
    }

    [Fact]
    public void Run_TargetAllocatesOverBound_FindingNamesTheCase()
    {
        HandshakeTarget target = (op, stream, uri, options) =>
        {
            GC.KeepAlive(new byte[2 * 1024 * 1024]); // what trusting a lying length would cost
            return Task.FromException(new NbdProtocolException(NbdProtocolError.Truncated, "eof"));
        };

        var report = new FuzzEngine(new FuzzSettings { Seed = 3, Cases = 4, Mode = FuzzMode.Handshake, Parallel = 1 }, target).Run();

        Assert.Equal(["3:0", "3:1", "3:2", "3:3"], report.Findings.Where(f => f.Kind == FindingKind.AllocationOverBound).Select(f => f.CaseId).Distinct().Order());
        Assert.True(report.MaxAllocated > 2 * 1024 * 1024);
    }

    [Fact]
    public void Run_TargetIgnoresTheServer_OracleMismatchOnUnmutatedStreams()
    {
        // Always "succeeds" with the same export: every valid stream with a different expectation must be caught.
        HandshakeTarget target = (op, stream, uri, options) => Task.FromResult(new NbdExportInfo("disk", 1, TransmissionFlags.None, null, null));

        var report = new FuzzEngine(new FuzzSettings { Seed = 9, Cases = 200, Mode = FuzzMode.Reconnect, Parallel = 1, SocketEvery = 0, MaxFindings = 1000 }, target).Run();

        Assert.True(report.Findings.Count(f => f.Kind == FindingKind.OracleMismatch) >= 300, $"{report.Findings.Count} findings");
    }
}

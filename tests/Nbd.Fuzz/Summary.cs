using System.Globalization;

namespace Nbd.Fuzz;

internal static class Summary
{
    public static void Print(FuzzReport r, FuzzSettings settings, TextWriter o)
    {
        var c = CultureInfo.InvariantCulture;
        o.WriteLine(string.Create(c, $"cases            {r.Cases}{(r.Aborted ? " (run stopped at a hang)" : "")}"));
        o.WriteLine(string.Create(c, $"streams served   {r.Streams}: {r.Hostile} hostile (mutated, truncated, random), {r.OracleChecks} valid with an exact expected outcome; {r.SocketStreams} more over loopback TCP"));
        o.WriteLine(string.Create(c, $"successes        {r.Successes}"));
        o.WriteLine(string.Create(c, $"failures         {r.Streams - r.Successes}"));
        foreach (var (outcome, count) in r.Failures.OrderByDescending(kv => kv.Value))
        {
            o.WriteLine(string.Create(c, $"  {count,10}  {outcome}"));
        }

        o.WriteLine(string.Create(c, $"max allocation   {r.MaxAllocated} B per handshake (case {r.MaxAllocatedCase}; bound {settings.AllocationBound} B)"));
        o.WriteLine(string.Create(c, $"max duration     {r.MaxDuration.TotalMilliseconds:0.###} ms per case (case {r.MaxDurationCase}; deadline {settings.Deadline.TotalMilliseconds:0} ms)"));
        o.WriteLine(string.Create(c, $"async completions {r.AsyncCompletions} (0 = every allocation was charged to its case)"));
        o.WriteLine(string.Create(c, $"peak GC heap     {r.PeakGcHeapBytes / (1024.0 * 1024):0.0} MiB (sampled every 20 ms)"));
        o.WriteLine(string.Create(c, $"peak RSS         {r.PeakWorkingSetBytes / (1024.0 * 1024):0.0} MiB"));
        o.WriteLine(string.Create(c, $"wall time        {r.Elapsed.TotalSeconds:0.0} s, {r.Streams / Math.Max(r.Elapsed.TotalSeconds, 1e-9):0} streams/s"));
        o.WriteLine(string.Create(c, $"findings         {r.Findings.Count}"));
        foreach (var f in r.Findings)
        {
            o.WriteLine($"  {f}");
        }
    }
}

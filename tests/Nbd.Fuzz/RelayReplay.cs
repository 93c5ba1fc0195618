using System.Globalization;

namespace Nbd.Fuzz;

/// <summary>--replay SEED:INDEX --mode relay: rebuilds one relay case, prints its requests and stream, runs it.</summary>
internal static class RelayReplay
{
    /// <summary>Hex beyond this many bytes is elided (a case may carry megabytes of read data).</summary>
    private const int HexLimit = 4096;

    public static int Run(string id, FuzzSettings settings, TextWriter o)
    {
        string[] parts = id.Split(':');
        if (parts.Length != 2
            || !ulong.TryParse(parts[0], NumberStyles.Integer, CultureInfo.InvariantCulture, out ulong seed)
            || !long.TryParse(parts[1], NumberStyles.Integer, CultureInfo.InvariantCulture, out long index))
        {
            o.WriteLine($"--replay takes SEED:INDEX, not '{id}'.");
            return 2;
        }

        var c = RelayCaseGenerator.Build(seed, index, describe: true);
        var inv = CultureInfo.InvariantCulture;
        o.WriteLine(string.Create(inv, $"case {c.Id}: relay, {c.Requests.Length} requests, {RelayEngine.OracleText(settings.Oracle)}"));
        foreach (var request in c.Requests)
        {
            o.WriteLine($"  {request}");
        }

        o.WriteLine(string.Create(inv,
            $"first server: {c.Stream.Length} bytes in writes of at most {(c.MaxChunk == int.MaxValue ? "any" : c.MaxChunk.ToString(inv))} bytes, then EOF; {c.Description}"));
        o.WriteLine($"  hex: {Convert.ToHexString(c.Stream, 0, Math.Min(c.Stream.Length, HexLimit))}{(c.Stream.Length > HexLimit ? "..." : "")}");

        var result = RelayHarness.Run(c, settings.Deadline, settings.Oracle);
        o.WriteLine(string.Create(inv, $"  dropped because: {result.LostDetail ?? result.Lost}"));
        o.WriteLine(string.Create(inv,
            $"  replies: {result.FromHostile} from the first server ({result.HostileErrors} errors), {result.FromValid} from the valid server; {result.Reconnects} reconnects"));
        o.WriteLine(string.Create(inv,
            $"  relay server thread allocated {result.HostileAllocated} B on the first connection (bound {result.AllocationBound} B); {result.Duration.TotalMilliseconds:0.###} ms"));
        foreach (var f in RelayEngine.Findings(c, result, settings.Oracle))
        {
            o.WriteLine($"  FINDING {f}");
        }

        return result.Problems.Count == 0 ? 0 : 1;
    }
}

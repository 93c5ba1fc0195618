using System.Globalization;

namespace Nbd.Fuzz;

/// <summary>--replay SEED:INDEX: rebuilds one case, prints each stream and what the client made of it.</summary>
internal static class Replay
{
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

        var c = CaseGenerator.Build(seed, index, settings.Mode, describe: true);
        o.WriteLine($"case {c.Id}: {(c.Reconnect ? "reconnect" : "handshake")}, operation {c.Operation}, uri {(c.Tls ? "nbds" : "nbd")}://fuzz/{Corpus.ExportName}");
        var (options, clock) = FuzzEngine.ClientConfiguration(settings.HandshakeTimeout);
        var outcomes = new string[c.Streams.Length];
        int findings = 0;
        for (int i = 0; i < c.Streams.Length; i++)
        {
            var s = c.Streams[i];
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"stream {i}: {s.Bytes.Length} bytes, reads of at most {(s.MaxChunk == int.MaxValue ? "any" : s.MaxChunk.ToString(CultureInfo.InvariantCulture))} bytes, then {(s.Stall ? "silence" : "EOF")}; {s.Description}"));
            o.WriteLine($"  hex: {Convert.ToHexString(s.Bytes)}");
            if (s.Expected is not null)
            {
                o.WriteLine($"  expected: {s.Expected}");
            }

            var result = FuzzEngine.RunStream(NbdClientTarget.Instance, c.Operation, c.Tls, options, clock, s);
            outcomes[i] = result.Outcome;
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  outcome: {result.Outcome}; {result.Allocated} B allocated; {result.Duration.TotalMilliseconds:0.###} ms"));
            if (result.Exception is not null)
            {
                o.WriteLine($"  message: {result.Exception.Message}");
            }

            foreach (var f in FuzzEngine.Check(c, i, s, result, settings.AllocationBound))
            {
                o.WriteLine($"  FINDING {f}");
                findings++;
            }
        }

        if (c.Reconnect && settings.SocketEvery > 0)
        {
            foreach (var f in LoopbackReplay.Compare(c, outcomes, settings.Deadline))
            {
                o.WriteLine($"  FINDING {f}");
                findings++;
            }

            o.WriteLine("  (also replayed over loopback TCP through NbdClient.ConnectAsync)");
        }

        return findings == 0 ? 0 : 1;
    }
}

using System.Globalization;

namespace Nbd.Fuzz;

internal enum FuzzMode
{
    Handshake,
    Reconnect,
    All,

    /// <summary>The transmission relay (RelayEngine); not part of All, whose seeds keep their meaning.</summary>
    Relay,
}

/// <summary>One connection's worth of server bytes.</summary>
/// <param name="Bytes">What the server sends.</param>
/// <param name="MaxChunk">Largest read the server's side returns at once (short reads split every field).</param>
/// <param name="Stall">After the bytes the server goes silent instead of closing.</param>
/// <param name="Expected">The exact outcome for a stream the corpus built unmutated; null for hostile ones.</param>
/// <param name="Description">How the stream was made (filled for --replay only).</param>
internal sealed record ServedStream(byte[] Bytes, int MaxChunk, bool Stall, string? Expected, string Description);

/// <summary>
/// One case carries exactly one hostile stream (mutated, truncated or random). Handshake mode: that stream, after
/// an unmutated one of the same operation in one case of eight (the oracle). Reconnect mode: three connections on
/// one client configuration (same URI, options and clock): a valid server, the hostile one, then another valid
/// server whose different style/size/flags/block sizes must be reported as they are now.
/// </summary>
internal sealed record FuzzCase(ulong Seed, long Index, bool Reconnect, FuzzOperation Operation, bool Tls, ServedStream[] Streams)
{
    public string Id => string.Create(CultureInfo.InvariantCulture, $"{Seed}:{Index}");
}

/// <summary>Builds case <c>index</c> of <c>seed</c> from nothing else, so any case can be replayed alone.</summary>
internal static class CaseGenerator
{
    public static bool IsReconnect(FuzzMode mode, long index) => mode switch
    {
        FuzzMode.Handshake => false,
        FuzzMode.Reconnect => true,
        FuzzMode.All => (index & 1) == 1,
        _ => throw new ArgumentOutOfRangeException(nameof(mode), mode, "relay cases are RelayCaseGenerator's"),
    };

    public static FuzzCase Build(ulong seed, long index, FuzzMode mode, bool describe = false)
    {
        var r = new FuzzRandom(seed, index);
        if (IsReconnect(mode, index))
        {
            ServedStream first = Valid(ref r, FuzzOperation.Go, tls: false, describe, "first connection");
            ServedStream hostile = Hostile(ref r, FuzzOperation.Go, tls: false, describe);
            ServedStream again = Valid(ref r, FuzzOperation.Go, tls: false, describe, "reconnect after it");
            return new FuzzCase(seed, index, true, FuzzOperation.Go, false, [first, hostile, again]);
        }

        var operation = r.Next(10) switch
        {
            < 5 => FuzzOperation.Go,
            < 7 => FuzzOperation.List,
            _ => FuzzOperation.Info,
        };
        bool tls = r.OneIn(16);
        ServedStream[] streams = r.OneIn(8)
            ? [Valid(ref r, operation, tls, describe, "valid first"), Hostile(ref r, operation, tls, describe)]
            : [Hostile(ref r, operation, tls, describe)];
        return new FuzzCase(seed, index, false, operation, tls, streams);
    }

    private static ServedStream Valid(ref FuzzRandom r, FuzzOperation operation, bool tls, bool describe, string role)
    {
        var valid = Corpus.Build(ref r, operation, tls);
        return new ServedStream(valid.Writer.ToArray(), Chunk(ref r), Stall(ref r), valid.Expected, describe ? $"{role}: valid {valid.Shape}" : "");
    }

    private static ServedStream Hostile(ref FuzzRandom r, FuzzOperation operation, bool tls, bool describe)
    {
        int family = r.Next(100);
        int chunk = Chunk(ref r);
        bool stall = Stall(ref r);
        var log = describe ? new List<string>() : null;
        if (family < 3)
        {
            var noise = new byte[r.Next(0, 300)];
            r.Fill(noise);
            return new ServedStream(noise, chunk, stall, null, describe ? "random bytes" : "");
        }

        if (family < 8)
        {
            var noise = new byte[r.Next(0, 200)];
            r.Fill(noise);
            var writer = new ServerWriter().Newstyle((ushort)r.Next(0, 4)).Garbage(noise);
            return new ServedStream(writer.ToArray(), chunk, stall, null, describe ? "newstyle greeting + random bytes" : "");
        }

        var valid = Corpus.Build(ref r, operation, tls);
        if (family < 20)
        {
            byte[] prefix = Mutator.Truncate(ref r, valid.Writer, log);
            return new ServedStream(prefix, chunk, stall, null, describe ? $"{valid.Shape}: {string.Join("; ", log!)}" : "");
        }

        // A donor of another operation, so GO replies land in a LIST and greetings land mid-stream.
        var donorOperation = (FuzzOperation)r.Next(3);
        var donor = Corpus.Build(ref r, donorOperation, r.OneIn(8));
        byte[] mutated = Mutator.Mutate(ref r, valid.Writer, donor.Writer, log);
        return new ServedStream(mutated, chunk, stall, null, describe ? $"{valid.Shape}: {string.Join("; ", log!)}" : "");
    }

    private static int Chunk(ref FuzzRandom r) => r.OneIn(2) ? int.MaxValue : r.Next(1, 33);

    private static bool Stall(ref FuzzRandom r) => r.OneIn(16);
}

using System.Buffers.Binary;
using System.Globalization;
using Nbd.Protocol.Transmission;

namespace Nbd.Fuzz;

/// <summary>
/// One request the fuzzer's "kernel" sends through the relay (proto.md "Request message"). Sequence is its place in
/// the kernel's order (the relay resends in that order); Data is a write's payload, null for every other type.
/// </summary>
internal sealed record RelayRequest(int Sequence, NbdCommand Type, ushort Flags, ulong Cookie, ulong Offset, uint Length, byte[]? Data)
{
    /// <summary>Data that follows a successful reply: a read's, of the request's length (never the server's word).</summary>
    public int ReplyDataLength => Type == NbdCommand.Read ? (int)Length : 0;

    public byte[] Header()
    {
        var h = new byte[NbdTransmission.RequestLength];
        BinaryPrimitives.WriteUInt32BigEndian(h, NbdTransmission.RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(h.AsSpan(4), Flags);
        BinaryPrimitives.WriteUInt16BigEndian(h.AsSpan(6), (ushort)Type);
        BinaryPrimitives.WriteUInt64BigEndian(h.AsSpan(8), Cookie);
        BinaryPrimitives.WriteUInt64BigEndian(h.AsSpan(16), Offset);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(24), Length);
        return h;
    }

    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"#{Sequence} {Type} cookie 0x{Cookie:x16} offset {Offset} length {Length}{(Flags != 0 ? $" flags 0x{Flags:x4}" : "")}");
}

/// <summary>
/// One relay case: the requests the kernel sends, and what the first (hostile) server answers them with: a valid
/// reply stream for those requests, mutated. Every byte of it is rebuilt from (seed, index) alone. MaxChunk is the
/// largest write the hostile server makes at once (small ones split headers across the relay's recv calls).
/// </summary>
internal sealed record RelayCase(ulong Seed, long Index, RelayRequest[] Requests, byte[] Stream, int MaxChunk, string Description)
{
    public string Id => string.Create(CultureInfo.InvariantCulture, $"{Seed}:{Index}");

    /// <summary>What the relay may legitimately allocate for this case's replies: each read's data once (pooled).</summary>
    public long ReadBytes => Requests.Sum(r => (long)r.ReplyDataLength);
}

/// <summary>
/// The disk both servers serve: reads go to [0, 1 TiB), writes to [1 TiB, 2 TiB), so a read's data never depends on
/// which server a write reached or in which order. Every byte is a function of its offset, so data delivered for the
/// wrong request or at a shifted position differs.
/// </summary>
internal static class RelayDisk
{
    public const ulong WriteRegion = 1UL << 40;

    /// <summary>The disk's bytes at <paramref name="offset"/> (a multiple of 8, as every read offset here is).</summary>
    public static void Fill(Span<byte> data, ulong offset)
    {
        // One 64-bit word per 8 bytes: position-dependent, and fast enough for megabyte reads.
        ulong word = offset / 8;
        while (data.Length >= 8)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(data, Word(word++));
            data = data[8..];
        }

        Span<byte> last = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(last, Word(word));
        last[..data.Length].CopyTo(data);
    }

    private static ulong Word(ulong index) => (index + 1) * 0x9E3779B97F4A7C15;

    public static byte[] Read(ulong offset, int length)
    {
        var data = new byte[length];
        Fill(data, offset);
        return data;
    }
}

/// <summary>Builds relay case <c>index</c> of <c>seed</c>.</summary>
internal static class RelayCaseGenerator
{
    private static readonly uint[] Errors = [5, 1, 28, 22, 12, 108]; // EIO EPERM ENOSPC EINVAL ENOMEM ESHUTDOWN

    public static RelayCase Build(ulong seed, long index, bool describe = false)
    {
        var r = new FuzzRandom(seed, index);
        RelayRequest[] requests = Requests(ref r);
        var log = describe ? new List<string>() : null;
        byte[] stream = Hostile(ref r, requests, log);
        // Tiny writes split headers across the relay's reads; one syscall each, so only for short streams.
        int chunk = stream.Length <= 16 * 1024 && r.OneIn(6) ? r.Next(1, 64) : int.MaxValue;
        return new RelayCase(seed, index, requests, stream, chunk, log is null ? "" : string.Join("; ", log));
    }

    /// <summary>1-8 requests (1 in 8: 9-32), the mix the driver sends, cookies distinct (0 and small ones included).</summary>
    private static RelayRequest[] Requests(ref FuzzRandom r)
    {
        int count = r.OneIn(8) ? r.Next(9, 33) : r.Next(1, 9);
        var requests = new RelayRequest[count];
        var cookies = new HashSet<ulong>();
        ulong sequential = r.OneIn(4) ? (ulong)r.Next(0, 3) : 0;
        for (int i = 0; i < count; i++)
        {
            ulong cookie;
            do
            {
                cookie = sequential != 0 || r.OneIn(3) ? sequential++ : r.NextU64();
            }
            while (!cookies.Add(cookie));

            int kind = r.Next(100);
            var type = kind switch
            {
                < 50 => NbdCommand.Read,
                < 70 => NbdCommand.Write,
                < 80 => NbdCommand.Flush,
                < 90 => NbdCommand.Trim,
                < 95 => NbdCommand.WriteZeroes,
                _ => NbdCommand.Cache,
            };
            requests[i] = type switch
            {
                NbdCommand.Read => new RelayRequest(i, type, 0, cookie, 512UL * (ulong)r.Next(0, 1 << 30), DataLength(ref r), null),
                NbdCommand.Write => Write(ref r, i, cookie),
                NbdCommand.Flush => new RelayRequest(i, type, 0, cookie, 0, 0, null),
                // Lengths of commands without data are the kernel's word, never an allocation: make some huge.
                _ => new RelayRequest(i, type, (ushort)(r.OneIn(2) ? 0 : 2), cookie, 512UL * (ulong)r.Next(0, 1 << 30), r.OneIn(4) ? 0xffff_fe00u : (uint)(512 * r.Next(1, 1 << 16)), null),
            };
        }

        return requests;
    }

    private static RelayRequest Write(ref FuzzRandom r, int sequence, ulong cookie)
    {
        uint length = DataLength(ref r);
        var data = new byte[length];
        r.FillBulk(data);
        return new RelayRequest(sequence, NbdCommand.Write, (ushort)(r.OneIn(4) ? 1 : 0), cookie, RelayDisk.WriteRegion + (512UL * (ulong)r.Next(0, 1 << 30)), length, data);
    }

    private static uint DataLength(ref FuzzRandom r) => r.Next(1000) switch
    {
        < 10 => 0,
        < 420 => (uint)(512 * r.Next(1, 9)),
        < 680 => (uint)(4096 * r.Next(1, 5)),
        < 950 => (uint)r.Next(1, 4097),
        < 989 => 65536,
        < 999 => 131072,
        _ => 1 << 20,
    };

    /// <summary>The replies a correct server sends: in order or shuffled, 1 in 10 an error (no data follows it).</summary>
    private static List<byte[]> ValidReplies(ref FuzzRandom r, RelayRequest[] requests)
    {
        var order = Enumerable.Range(0, requests.Length).ToArray();
        if (r.OneIn(2))
        {
            for (int i = order.Length - 1; i > 0; i--)
            {
                int j = r.Next(i + 1);
                (order[i], order[j]) = (order[j], order[i]);
            }
        }

        var replies = new List<byte[]>(requests.Length);
        foreach (int i in order)
        {
            var request = requests[i];
            uint error = r.OneIn(10) ? r.Pick<uint>(Errors) : 0;
            int length = error == 0 ? request.ReplyDataLength : 0;
            replies.Add(Reply(NbdTransmission.SimpleReplyMagic, error, request.Cookie, request.Offset, length));
        }

        return replies;
    }

    public static byte[] Reply(uint magic, uint error, ulong cookie, ulong offset, int length)
    {
        var reply = new byte[NbdTransmission.SimpleReplyLength + length];
        BinaryPrimitives.WriteUInt32BigEndian(reply, magic);
        BinaryPrimitives.WriteUInt32BigEndian(reply.AsSpan(4), error);
        BinaryPrimitives.WriteUInt64BigEndian(reply.AsSpan(8), cookie);
        RelayDisk.Fill(reply.AsSpan(NbdTransmission.SimpleReplyLength), offset);
        return reply;
    }

    private static byte[] Concat(List<byte[]> replies)
    {
        var all = new byte[replies.Sum(x => x.Length)];
        int at = 0;
        foreach (byte[] reply in replies)
        {
            reply.CopyTo(all, at);
            at += reply.Length;
        }

        return all;
    }

    private static ServerWriter Writer(List<byte[]> replies)
    {
        var w = new ServerWriter();
        foreach (byte[] reply in replies)
        {
            w.SimpleReply(BinaryPrimitives.ReadUInt32BigEndian(reply.AsSpan(4)), BinaryPrimitives.ReadUInt64BigEndian(reply.AsSpan(8)), reply.AsSpan(NbdTransmission.SimpleReplyLength));
        }

        return w;
    }

    private static byte[] Hostile(ref FuzzRandom r, RelayRequest[] requests, List<string>? log)
    {
        List<byte[]> replies = ValidReplies(ref r, requests);
        log?.Add(Invariant($"valid replies in order {string.Join(",", replies.Select(x => Array.FindIndex(requests, q => q.Cookie == BinaryPrimitives.ReadUInt64BigEndian(x.AsSpan(8)))))}"));
        int family = r.Next(100);
        if (family < 4)
        {
            var noise = new byte[r.Next(0, 300)];
            r.Fill(noise);
            log?.Add(Invariant($"replaced by {noise.Length} random bytes"));
            return noise;
        }

        if (family < 8)
        {
            log?.Add("unmutated");
            return Concat(replies);
        }

        if (family < 20)
        {
            return Mutator.Truncate(ref r, Writer(replies), log);
        }

        if (family < 32)
        {
            // The resend path proper: the server answers some requests, then the connection ends between replies.
            int keep = r.Next(replies.Count);
            log?.Add(Invariant($"only the first {keep} of {replies.Count} replies, then EOF"));
            return [.. replies.Take(keep).SelectMany(x => x)];
        }

        if (family < 60)
        {
            for (int m = r.Next(1, 4); m > 0; m--)
            {
                MutateReplies(ref r, replies, requests, log);
            }

            byte[] all = Concat(replies);
            if (r.OneIn(4) && all.Length > 0)
            {
                int cut = r.Next(all.Length);
                log?.Add(Invariant($"truncate to {cut} of {all.Length}"));
                all = all[..cut];
            }

            return all;
        }

        // Blind mutations aimed by the writer's field map; the donor (the same requests answered in another order,
        // other errors) provides whole replies to splice in: answers to cookies answered already.
        var donor = ValidReplies(ref r, requests);
        return Mutator.Mutate(ref r, Writer(replies), Writer(donor), log);
    }

    /// <summary>Mutations that know what a reply is: cookies, structured replies, data lengths, duplicates.</summary>
    private static void MutateReplies(ref FuzzRandom r, List<byte[]> replies, RelayRequest[] requests, List<string>? log)
    {
        if (replies.Count == 0)
        {
            replies.Add(Reply(NbdTransmission.SimpleReplyMagic, 0, r.NextU64(), 0, 0));
            log?.Add("a reply to a cookie never sent");
            return;
        }

        int j = r.Next(replies.Count);
        byte[] reply = replies[j];
        if (reply.Length < NbdTransmission.SimpleReplyLength)
        {
            // Random bytes an earlier mutation put between replies: not a reply to aim at.
            j = replies.FindIndex(x => x.Length >= NbdTransmission.SimpleReplyLength);
            if (j < 0)
            {
                return;
            }

            reply = replies[j];
        }

        ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(reply.AsSpan(8));
        switch (r.Next(10))
        {
            case 0:
                ulong other = requests[r.Next(requests.Length)].Cookie;
                BinaryPrimitives.WriteUInt64BigEndian(reply.AsSpan(8), other);
                log?.Add(Invariant($"reply {j}: cookie 0x{cookie:x16} -> 0x{other:x16} (another request's)"));
                break;
            case 1:
                ulong never = r.Next(4) switch { 0 => cookie ^ 1, 1 => ~cookie, 2 => cookie + 0x1_0000_0000, _ => r.NextU64() };
                BinaryPrimitives.WriteUInt64BigEndian(reply.AsSpan(8), never);
                log?.Add(Invariant($"reply {j}: cookie -> 0x{never:x16} (never sent, unless it collides)"));
                break;
            case 2:
                replies[j] = Structured(ref r, cookie, reply.Length - NbdTransmission.SimpleReplyLength);
                log?.Add(Invariant($"reply {j}: a structured reply chunk instead (never negotiated)"));
                break;
            case 3:
                int times = r.OneIn(4) ? r.Next(2, 10) : 1;
                int at = r.OneIn(2) ? j + 1 : replies.Count;
                for (int t = 0; t < times; t++)
                {
                    replies.Insert(at, (byte[])reply.Clone());
                }

                log?.Add(Invariant($"reply {j} duplicated x{times} at {at}"));
                break;
            case 4:
                replies.RemoveAt(j);
                log?.Add(Invariant($"reply {j} dropped"));
                break;
            case 5:
                // An error on a read that still carries its data, or a success without it: the framing shifts.
                uint error = BinaryPrimitives.ReadUInt32BigEndian(reply.AsSpan(4));
                uint flipped = error == 0 ? r.Pick<uint>(Errors) : 0;
                BinaryPrimitives.WriteUInt32BigEndian(reply.AsSpan(4), flipped);
                log?.Add(Invariant($"reply {j}: error {error} -> {flipped}, data unchanged"));
                break;
            case 6:
                uint magic = r.Next(3) switch { 0 => NbdTransmission.RequestMagic, 1 => r.NextU32(), _ => NbdTransmission.SimpleReplyMagic ^ (1u << r.Next(32)) };
                BinaryPrimitives.WriteUInt32BigEndian(reply, magic);
                log?.Add(Invariant($"reply {j}: magic -> 0x{magic:x8}"));
                break;
            case 7:
                int delta = r.Next(1, 600) * (r.OneIn(2) ? 1 : -1);
                int length = Math.Max(NbdTransmission.SimpleReplyLength, reply.Length + delta);
                var resized = new byte[length];
                reply.AsSpan(0, Math.Min(length, reply.Length)).CopyTo(resized);
                replies[j] = resized;
                log?.Add(Invariant($"reply {j}: {reply.Length} -> {length} bytes (data length != the request's)"));
                break;
            case 8 when replies.Count > 1:
                int k = r.Next(replies.Count);
                (replies[j], replies[k]) = (replies[k], replies[j]);
                log?.Add(Invariant($"replies {j} and {k} swapped"));
                break;
            default:
                var tail = new byte[r.Next(1, 65)];
                r.Fill(tail);
                replies.Insert(r.Next(replies.Count + 1), tail);
                log?.Add(Invariant($"{tail.Length} random bytes between replies"));
                break;
        }
    }

    /// <summary>proto.md "Structured reply chunk message": magic, flags (DONE), type OFFSET_DATA, cookie, length, offset, data.</summary>
    private static byte[] Structured(ref FuzzRandom r, ulong cookie, int dataLength)
    {
        var chunk = new byte[20 + 8 + dataLength];
        BinaryPrimitives.WriteUInt32BigEndian(chunk, NbdTransmission.StructuredReplyMagic);
        BinaryPrimitives.WriteUInt16BigEndian(chunk.AsSpan(4), 1);
        BinaryPrimitives.WriteUInt16BigEndian(chunk.AsSpan(6), (ushort)(r.OneIn(2) ? 1 : 0));
        BinaryPrimitives.WriteUInt64BigEndian(chunk.AsSpan(8), cookie);
        BinaryPrimitives.WriteUInt32BigEndian(chunk.AsSpan(16), (uint)(8 + dataLength));
        return chunk;
    }

    private static string Invariant(FormattableString s) => s.ToString(CultureInfo.InvariantCulture);
}

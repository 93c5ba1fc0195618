using System.Buffers.Binary;
using System.Globalization;

namespace Nbd.Fuzz;

/// <summary>
/// Turns a valid server stream into a hostile one. Most mutations aim at what a parser trusts: length fields
/// (set to 0, 4096±1, 64 KiB±1, 0x7fffffff, 0xffffffff...), magics, export sizes, message boundaries
/// (duplicated, dropped, swapped or spliced-in option replies), plus the blind ones (bit flips, interesting bytes,
/// insertion, deletion, truncation). Field offsets come from the <see cref="ServerWriter"/> and go stale after a
/// length-changing mutation; they are clamped, not recomputed, which is fine for a fuzzer.
/// </summary>
internal static class Mutator
{
    private static readonly byte[] Interesting8 = [0x00, 0x01, 0x7f, 0x80, 0xff];

    private static readonly uint[] Interesting32 =
    [
        0, 1, 2, 12, 14, 4095, 4096, 4097, 8196, 8197, 65535, 65536, 65537, 0x00ff_ffff, 0x7fff_fffe, 0x7fff_ffff,
        0x8000_0000, 0x8000_0001, 0xffff_fffe, 0xffff_ffff,
    ];

    private static readonly ulong[] Interesting64 = [0, 1, 511, 512, long.MaxValue, 0x8000_0000_0000_0000, ulong.MaxValue];

    /// <summary>Applies 1-4 mutations. <paramref name="donor"/> provides messages to splice in.</summary>
    public static byte[] Mutate(ref FuzzRandom r, ServerWriter stream, ServerWriter donor, List<string>? log)
    {
        var data = stream.ToArray().ToList();
        for (int m = r.Next(1, 5); m > 0; m--)
        {
            MutateOnce(ref r, data, stream, donor, log);
        }

        return [.. data];
    }

    /// <summary>A strict prefix: the server closed mid-message (or between messages).</summary>
    public static byte[] Truncate(ref FuzzRandom r, ServerWriter stream, List<string>? log)
    {
        byte[] all = stream.ToArray();
        int length = all.Length == 0 ? 0 : r.Next(all.Length);
        log?.Add(Invariant($"truncate to {length} of {all.Length}"));
        return all[..length];
    }

    private static void MutateOnce(ref FuzzRandom r, List<byte> data, ServerWriter stream, ServerWriter donor, List<string>? log)
    {
        int kind = r.Next(15);
        int at = data.Count == 0 ? 0 : r.Next(data.Count);
        switch (kind)
        {
            case 0 when data.Count > 0:
                int bit = r.Next(8);
                data[at] ^= (byte)(1 << bit);
                log?.Add(Invariant($"flip bit {bit} at {at}"));
                break;
            case 1 when data.Count > 0:
                byte b = r.Pick<byte>(Interesting8);
                data[at] = b;
                log?.Add(Invariant($"byte at {at} = 0x{b:x2}"));
                break;
            case 2 or 3 when stream.LengthFields.Count > 0:
                // The lying length: the bound must refuse it before anything is allocated.
                int field = r.Pick<int>(stream.LengthFields.ToArray());
                uint length = r.Pick<uint>(Interesting32);
                Write32(data, field, length);
                log?.Add(Invariant($"length field at {field} = 0x{length:x8}"));
                break;
            case 4 when data.Count >= 4:
                uint value = r.Pick<uint>(Interesting32);
                Write32(data, at, value);
                log?.Add(Invariant($"u32 at {at} = 0x{value:x8}"));
                break;
            case 5 when stream.SizeFields.Count > 0:
                int sizeAt = r.Pick<int>(stream.SizeFields.ToArray());
                ulong size = r.Pick<ulong>(Interesting64);
                Write64(data, sizeAt, size);
                log?.Add(Invariant($"size at {sizeAt} = 0x{size:x16}"));
                break;
            case 6 when stream.MagicFields.Count > 0:
                int magicAt = r.Pick<int>(stream.MagicFields.ToArray()) + r.Next(8);
                if (magicAt < data.Count)
                {
                    data[magicAt] ^= (byte)r.Next(1, 256);
                    log?.Add(Invariant($"corrupt magic byte at {magicAt}"));
                }

                break;
            case 7:
                int keep = data.Count == 0 ? 0 : r.Next(data.Count);
                data.RemoveRange(keep, data.Count - keep);
                log?.Add(Invariant($"truncate to {keep}"));
                break;
            case 8:
                var insert = new byte[r.Next(1, 17)];
                r.Fill(insert);
                data.InsertRange(at, insert);
                log?.Add(Invariant($"insert {insert.Length} random bytes at {at}"));
                break;
            case 9 when data.Count > 0:
                int remove = Math.Min(r.Next(1, 17), data.Count - at);
                data.RemoveRange(at, remove);
                log?.Add(Invariant($"delete {remove} bytes at {at}"));
                break;
            case 10 when stream.Messages.Count > 0:
                var (start, end) = Clamp(r.Pick<(int, int)>(stream.Messages.ToArray()), data.Count);
                var copy = data.GetRange(start, end - start);
                int times = r.OneIn(4) ? r.Next(2, 40) : 1;
                for (int i = 0; i < times; i++)
                {
                    data.InsertRange(end, copy);
                }

                log?.Add(Invariant($"duplicate message [{start},{end}) x{times}"));
                break;
            case 11 when stream.Messages.Count > 0:
                var (s, e) = Clamp(r.Pick<(int, int)>(stream.Messages.ToArray()), data.Count);
                data.RemoveRange(s, e - s);
                log?.Add(Invariant($"drop message [{s},{e})"));
                break;
            case 12 when stream.Messages.Count > 1:
                int first = r.Next(stream.Messages.Count - 1);
                var (s1, e1) = Clamp(stream.Messages[first], data.Count);
                var (s2, e2) = Clamp(stream.Messages[first + 1], data.Count);
                if (e1 <= s2 && s1 < e1 && s2 < e2)
                {
                    var a = data.GetRange(s1, e1 - s1);
                    var bb = data.GetRange(s2, e2 - s2);
                    data.RemoveRange(s1, e2 - s1);
                    data.InsertRange(s1, [.. bb, .. a]);
                    log?.Add(Invariant($"swap messages [{s1},{e1}) and [{s2},{e2})"));
                }

                break;
            case 13 when donor.Messages.Count > 0:
                // Splice a message of another valid stream (another option's replies, a greeting) in at a boundary.
                var (ds, de) = r.Pick<(int, int)>(donor.Messages.ToArray());
                int boundary = stream.Messages.Count == 0 ? at : Math.Min(r.Pick<(int, int)>(stream.Messages.ToArray()).Item1, data.Count);
                data.InsertRange(boundary, donor.ToArray()[ds..de]);
                log?.Add(Invariant($"splice donor message [{ds},{de}) at {boundary}"));
                break;
            default:
                var tail = new byte[r.Next(1, 65)];
                r.Fill(tail);
                data.AddRange(tail);
                log?.Add(Invariant($"append {tail.Length} random bytes"));
                break;
        }
    }

    private static (int Start, int End) Clamp((int Start, int End) message, int count) =>
        (Math.Min(message.Start, count), Math.Min(message.End, count));

    private static void Write32(List<byte> data, int at, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, value);
        for (int i = 0; i < 4 && at + i < data.Count; i++)
        {
            data[at + i] = b[i];
        }
    }

    private static void Write64(List<byte> data, int at, ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, value);
        for (int i = 0; i < 8 && at + i < data.Count; i++)
        {
            data[at + i] = b[i];
        }
    }

    private static string Invariant(FormattableString s) => s.ToString(CultureInfo.InvariantCulture);
}

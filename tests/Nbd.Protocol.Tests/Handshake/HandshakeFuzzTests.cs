using System.Text;
using FsCheck;
using FsCheck.Xunit;
using Nbd.Protocol.Tests.TestSupport;

namespace Nbd.Protocol.Tests.Handshake;

/// <summary>
/// Random and mutated server streams: the client either succeeds or raises an <see cref="NbdException"/> subclass,
/// promptly. Any other exception type, or a hang, is a bug in a bound or a parser.
/// </summary>
public sealed class HandshakeFuzzTests
{
    private const int Cases = 2000;
    private static readonly NbdClientOptions Options = new() { HandshakeTimeout = TimeSpan.FromSeconds(2), MaxListEntries = 50 };

    private static byte[] RandomBytes(Random r, int n)
    {
        var b = new byte[n];
        r.NextBytes(b);
        return b;
    }

    private static string RandomName(Random r) => r.Next(4) switch
    {
        0 => "",
        1 => "disk",
        2 => Encoding.UTF8.GetString(RandomBytes(r, r.Next(1, 40))),
        _ => new string('n', r.Next(1, 300)),
    };

    // NBD_FLAG_HAS_FLAGS always set, as proto.md requires: never 0, which the client refuses.
    private static TransmissionFlags RandomFlags(Random r) => (TransmissionFlags)(r.Next(0, 0x10000) | 1);

    // A valid server stream for one of the client's three operations (0 = GO, 1 = LIST, 2 = INFO).
    private static (byte[] Bytes, int Kind) ValidStream(Random r)
    {
        int style = r.Next(6);
        switch (style)
        {
            case 0:
                return (ServerScript.Oldstyle((ulong)r.NextInt64(), (uint)r.Next()).ToArray(), 0);
            case 1:
                return (ServerScript.Newstyle((ushort)(r.Next(2) * 2)).ExportNameReply((ulong)r.NextInt64(), RandomFlags(r), zeroes: r.Next(2) == 0).ToArray(), 0);
            case 2:
                var fallback = ServerScript.Newstyle((ushort)(1 | (r.Next(2) * 2))).Error(NbdOption.Go, NbdReplyType.ErrUnsup, r.Next(2) == 0 ? null : "unsupported");
                return (fallback.ExportNameReply((ulong)r.NextInt64(), RandomFlags(r), zeroes: r.Next(2) == 0).ToArray(), 0);
            case 3:
                var list = ServerScript.Newstyle(3);
                for (int i = r.Next(6); i > 0; i--)
                {
                    list.Server(RandomName(r), r.Next(2) == 0 ? null : "description");
                }

                return (list.Ack(NbdOption.List).Ack(NbdOption.Abort).ToArray(), 1);
            default:
                var option = style == 4 ? NbdOption.Go : NbdOption.Info;
                var go = ServerScript.Newstyle((ushort)r.Next(1, 4));
                var infos = new List<Action>
                {
                    () => go.InfoExport(option, (ulong)r.NextInt64(), RandomFlags(r)),
                    () => go.InfoBlockSize(option, 1u << r.Next(0, 17), 1u << r.Next(12, 20), r.Next(2) == 0 ? uint.MaxValue : 1u << 25),
                    () => go.InfoString(option, 1, "canonical"),
                    () => go.InfoString(option, 2, "description"),
                    () => go.Reply(option, NbdReplyType.Info, [0, 9, 1, 2, 3]),
                };
                foreach (var add in infos.OrderBy(_ => r.Next()))
                {
                    if (r.Next(3) != 0)
                    {
                        add();
                    }
                }

                if (r.Next(8) == 0)
                {
                    go.Error(option, (NbdReplyType)(0x8000_0000u | (uint)r.Next(1, 12)), "error text");
                }
                else
                {
                    go.Ack(option);
                }

                return (go.Ack(NbdOption.Abort).ToArray(), option == NbdOption.Go ? 0 : 2);
        }
    }

    private static byte[] Mutate(Random r, byte[] bytes)
    {
        var data = new List<byte>(bytes);
        for (int m = r.Next(1, 5); m > 0; m--)
        {
            int at = data.Count == 0 ? 0 : r.Next(data.Count);
            switch (r.Next(7))
            {
                case 0 when data.Count > 0:
                    data[at] ^= (byte)(1 << r.Next(8));
                    break;
                case 1 when data.Count > 0:
                    data[at] = (byte)r.Next(256);
                    break;
                case 2:
                    data.RemoveRange(at, data.Count - at); // truncate
                    break;
                case 3:
                    data.InsertRange(at, RandomBytes(r, r.Next(1, 16)));
                    break;
                case 4 when data.Count >= 4:
                    // Overwrite a 32-bit field with a huge value: the typical lying length.
                    int field = Math.Min(at, data.Count - 4);
                    uint huge = r.Next(2) == 0 ? uint.MaxValue : (uint)r.Next(4097, int.MaxValue);
                    for (int i = 0; i < 4; i++)
                    {
                        data[field + i] = (byte)(huge >> (24 - (8 * i)));
                    }

                    break;
                case 5 when data.Count > 0:
                    data.RemoveAt(at);
                    break;
                default:
                    data.AddRange(RandomBytes(r, r.Next(1, 64)));
                    break;
            }
        }

        return [.. data];
    }

    private static Task Run(Stream stream, int kind, bool tls)
    {
        var uri = NbdUri.Parse(tls ? "nbds://fuzz/disk" : "nbd://fuzz/disk");
        return kind switch
        {
            0 => NbdClient.NegotiateAsync(stream, uri, Options, CancellationToken.None),
            1 => NbdClient.NegotiateListAsync(stream, uri, Options, CancellationToken.None),
            _ => NbdClient.NegotiateInfoAsync(stream, uri, Options, CancellationToken.None),
        };
    }

    [Fact]
    public async Task RandomAndMutatedStreams_OnlyNbdExceptionsOrSuccess_NeverHang()
    {
        var random = new Random(20251125);
        int successes = 0;
        var failures = new Dictionary<string, int>();
        for (int i = 0; i < Cases; i++)
        {
            int mode = random.Next(10);
            byte[] bytes;
            int kind;
            if (mode == 0)
            {
                bytes = RandomBytes(random, random.Next(0, 300));
                kind = random.Next(3);
            }
            else if (mode == 1)
            {
                // Valid greeting, then noise: exercises the option reply parser rather than the magic check.
                bytes = [.. ServerScript.Newstyle(3).ToArray(), .. RandomBytes(random, random.Next(0, 200))];
                kind = random.Next(3);
            }
            else
            {
                (bytes, kind) = ValidStream(random);
                if (mode > 2)
                {
                    bytes = Mutate(random, bytes);
                }
            }

            bool tls = random.Next(20) == 0;
            var stream = new ScriptedStream(bytes, maxChunk: random.Next(2) == 0 ? int.MaxValue : random.Next(1, 32));
            try
            {
                await Run(stream, kind, tls).WaitAsync(TimeSpan.FromSeconds(5));
                successes++;
            }
            catch (NbdException ex)
            {
                string key = ex.GetType().Name;
                failures[key] = failures.GetValueOrDefault(key) + 1;
            }
            catch (Exception ex)
            {
                Assert.Fail($"case {i} (kind {kind}, tls {tls}) raised {ex.GetType()}: {ex}\nstream: {Convert.ToHexString(bytes)}");
            }
        }

        // The generator must actually reach both outcomes and several error types, or it tests nothing.
        Assert.True(successes > Cases / 10, $"only {successes} successes");
        Assert.True(failures.GetValueOrDefault(nameof(NbdProtocolException)) > Cases / 10, string.Join(", ", failures));
        Assert.True(failures.ContainsKey(nameof(NbdServerErrorException)), string.Join(", ", failures));
    }

    [Fact]
    public async Task MutatedStreamsThenSilence_TimeoutOrNbdException()
    {
        var random = new Random(7);
        var options = new NbdClientOptions { HandshakeTimeout = TimeSpan.FromMilliseconds(40) };
        for (int i = 0; i < 25; i++)
        {
            var (bytes, kind) = ValidStream(random);
            bytes = Mutate(random, bytes);
            var uri = NbdUri.Parse("nbd://fuzz/disk");
            var stream = new SilentStream(bytes);
            Task run = kind switch
            {
                0 => NbdClient.NegotiateAsync(stream, uri, options, CancellationToken.None),
                1 => NbdClient.NegotiateListAsync(stream, uri, options, CancellationToken.None),
                _ => NbdClient.NegotiateInfoAsync(stream, uri, options, CancellationToken.None),
            };
            try
            {
                await run.WaitAsync(TimeSpan.FromSeconds(5));
            }
            catch (NbdException)
            {
            }
        }
    }

    [Property(MaxTest = 500)]
    public bool Uri_AnyExportName_RoundTripsThroughToString(NonNull<string> name)
    {
        string export = name.Get.Replace("\0", "", StringComparison.Ordinal);
        try
        {
            if (new UTF8Encoding(false, throwOnInvalidBytes: true).GetByteCount(export) > 4096)
            {
                return true; // over-long names are rejected (tested elsewhere)
            }
        }
        catch (EncoderFallbackException)
        {
            return true; // lone surrogates have no UTF-8 form, so no URI can carry them
        }

        var uri = new NbdUri { Scheme = "nbd", Host = "h", Port = 10809, ExportName = export };
        return NbdUri.Parse(uri.ToString()) == uri;
    }
}

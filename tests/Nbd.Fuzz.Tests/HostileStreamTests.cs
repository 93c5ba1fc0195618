using System.Buffers.Binary;
using Nbd.Protocol;

namespace Nbd.Fuzz.Tests;

/// <summary>Targeted hostile servers against the real client, measured as the engine measures them.</summary>
public sealed class HostileStreamTests
{
    private const long TightBound = 16 * 1024; // far below every announced length below

    private static StreamResult Serve(FuzzOperation operation, byte[] bytes)
    {
        var (options, clock) = FuzzEngine.ClientConfiguration(TimeSpan.FromSeconds(10));
        var served = new ServedStream(bytes, int.MaxValue, Stall: false, Expected: null, "");
        return FuzzEngine.RunStream(NbdClientTarget.Instance, operation, tls: false, options, clock, served);
    }

    private static byte[] ReplyHeader(NbdOption option, uint type, uint length)
    {
        var header = new byte[20];
        BinaryPrimitives.WriteUInt64BigEndian(header, ServerWriter.ReplyMagic);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(8), (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(12), type);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), length);
        return header;
    }

    [Theory]
    [InlineData(0, 7u, 3u, 0xffff_ffffu)]      // NBD_REP_INFO to GO
    [InlineData(0, 7u, 3u, 0x7fff_ffffu)]
    [InlineData(0, 7u, 3u, 0x8000_0000u)]
    [InlineData(0, 7u, 3u, 65537u)]           // one over the 64 KiB reply bound
    [InlineData(0, 7u, 1u, 1u)]               // NBD_REP_ACK carries nothing
    [InlineData(0, 7u, 0x8000_0002u, 0xffff_ffffu)] // NBD_REP_ERR_POLICY message
    [InlineData(0, 7u, 0x8000_0002u, 4097u)]
    [InlineData(2, 6u, 3u, 0xffff_ffffu)]
    [InlineData(1, 3u, 2u, 0xffff_ffffu)]   // NBD_REP_SERVER
    [InlineData(1, 3u, 2u, 8201u)]          // one over 4 + 2 × 4096
    public void HugeReplyLength_RefusedBeforeAllocating(int operation, uint option, uint type, uint length)
    {
        // No payload follows: a client that tried to read it would report Truncated, not OversizedLength.
        byte[] bytes = [.. new ServerWriter().Newstyle(3).ToArray(), .. ReplyHeader((NbdOption)option, type, length)];

        var result = Serve((FuzzOperation)operation, bytes);

        Assert.Equal("NbdProtocolException:OversizedLength", result.Outcome);
        Assert.InRange(result.Allocated, 0, TightBound);
    }

    [Fact]
    public void HugeNameLengthInsideServerReply_RefusedWithoutAllocating()
    {
        byte[] payload = new byte[8];
        BinaryPrimitives.WriteUInt32BigEndian(payload, 0xffff_ffff);
        byte[] bytes = [.. new ServerWriter().Newstyle(3).Reply(NbdOption.List, NbdReplyType.Server, payload).ToArray()];

        var result = Serve(FuzzOperation.List, bytes);

        Assert.Equal("NbdProtocolException:OversizedLength", result.Outcome);
        Assert.InRange(result.Allocated, 0, TightBound);
    }

    [Fact]
    public void EveryStrictPrefixOfValidGoStreams_Truncated()
    {
        int prefixes = 0;
        for (long index = 0; index < 60; index++)
        {
            var r = new FuzzRandom(77, index);
            var valid = Corpus.Build(ref r, FuzzOperation.Go, tls: false);
            byte[] all = valid.Writer.ToArray();
            Assert.Equal(valid.Expected, Serve(FuzzOperation.Go, all).Outcome);
            for (int length = 0; length < all.Length; length++)
            {
                var result = Serve(FuzzOperation.Go, all[..length]);
                Assert.True(result.Outcome == "NbdProtocolException:Truncated",
                    $"{valid.Shape} cut to {length} of {all.Length}: {result.Outcome}\n{Convert.ToHexString(all)}");
                prefixes++;
            }
        }

        Assert.True(prefixes > 5000, $"{prefixes} prefixes");
    }

    [Fact]
    public void Reconnect_OneConfiguration_ReportsEachServerAsItIsNow()
    {
        var (options, clock) = FuzzEngine.ClientConfiguration(TimeSpan.FromSeconds(10));
        var first = new ServerWriter().Newstyle(3).InfoExport(NbdOption.Go, 1 << 20, 0x0001).InfoBlockSize(NbdOption.Go, 512, 4096, 1 << 25).Ack(NbdOption.Go);
        var garbage = new ServerWriter().Newstyle(3).Garbage(Enumerable.Repeat((byte)0xde, 24).ToArray());
        var second = new ServerWriter().Oldstyle(3 << 20, 0x0003);

        string Run(ServerWriter w, bool stall = false) =>
            FuzzEngine.RunStream(NbdClientTarget.Instance, FuzzOperation.Go, tls: false, options, clock, new ServedStream(w.ToArray(), 7, stall, null, "")).Outcome;

        Assert.Equal("ok export name='disk' size=1048576 flags=0x0001 bs=512/4096/33554432 desc=-", Run(first));
        Assert.Equal("NbdProtocolException:BadMagic", Run(garbage));
        Assert.Equal("NbdTimeoutException:Handshake", Run(new ServerWriter().Newstyle(3), stall: true));
        // An oldstyle server cannot be asked for 'disk': refused, not served under that name.
        Assert.Equal("NbdProtocolException:Unsupported", Run(second));
    }

    [Fact]
    public void Loopback_ValidStream_SameOutcomeAsInMemory()
    {
        var r = new FuzzRandom(11, 0);
        var valid = Corpus.Build(ref r, FuzzOperation.Go, tls: false);
        var options = new NbdClientOptions { ConnectTimeout = TimeSpan.FromSeconds(5), HandshakeTimeout = TimeSpan.FromSeconds(5) };

        Assert.Equal(valid.Expected, LoopbackReplay.Run(valid.Writer.ToArray(), options, TimeSpan.FromSeconds(5)));
        Assert.Equal("NbdProtocolException:Truncated", LoopbackReplay.Run(valid.Writer.ToArray()[..20], options, TimeSpan.FromSeconds(5)));
    }

    [Fact]
    public void Replay_KnownCase_PrintsHexExpectedAndOutcome()
    {
        using var output = new StringWriter();

        int exit = Replay.Run("1:999", new FuzzSettings { Mode = FuzzMode.All }, output);

        string text = output.ToString();
        Assert.Equal(0, exit);
        Assert.Contains("case 1:999: reconnect", text, StringComparison.Ordinal);
        Assert.Equal(3, text.Split("hex: ").Length - 1);
        Assert.Contains("outcome: ok export", text, StringComparison.Ordinal);
        Assert.Contains("replayed over loopback TCP", text, StringComparison.Ordinal);
    }

    [Fact]
    public void Generator_SameSeedAndIndex_SameStreams()
    {
        var a = CaseGenerator.Build(123, 456_789, FuzzMode.All);
        var b = CaseGenerator.Build(123, 456_789, FuzzMode.All);
        var c = CaseGenerator.Build(123, 456_790, FuzzMode.All);

        Assert.Equal(a.Streams.Select(s => Convert.ToHexString(s.Bytes)), b.Streams.Select(s => Convert.ToHexString(s.Bytes)));
        Assert.NotEqual(a.Reconnect, c.Reconnect);
    }

    [Theory]
    [InlineData("--mode", "sideways")]
    [InlineData("--streams", "0")]
    [InlineData("--parallel", "x")]
    [InlineData("--bogus", "1")]
    public void Arguments_Invalid_FormatException(string name, string value) =>
        Assert.Throws<FormatException>(() => Arguments.Parse([name, value]));
}

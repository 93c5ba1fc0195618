using System.Buffers.Binary;
using Nbd.Protocol.Transmission;

namespace Nbd.Fuzz.Tests;

/// <summary>
/// The relay mode at CI size against the real NbdRelay over AF_UNIX pairs, and hand-built hostile first servers:
/// what the relay must drop, what it must forward, and that the kernel then gets one well-formed reply per request.
/// </summary>
public sealed class RelayFuzzTests
{
    private const long CiCases = 3_000;
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(10);

    [Fact]
    public void Run_CiSampleOfRelayCases_NoFindingAndEveryDropReasonReached()
    {
        var settings = new FuzzSettings { Seed = 20251125, Cases = CiCases, Mode = FuzzMode.Relay, Parallel = 2 };

        var report = new RelayEngine(settings).Run();

        Assert.True(report.Findings.Count == 0, string.Join("\n", report.Findings));
        Assert.Equal(CiCases, report.Cases);
        // 10–25 s on the shared host. Not a speed target: a bound far above that, which cases that each waited out a
        // 5 s timeout would still blow through.
        Assert.True(report.Elapsed < TimeSpan.FromSeconds(300), $"took {report.Elapsed}");

        // The generator must reach every way the relay drops a server, both kinds of forwarded reply and the resend.
        string lost = string.Join(", ", report.Lost.Select(kv => $"{kv.Key}={kv.Value}"));
        foreach (string reason in new[] { "bad reply magic", "structured reply", "cookie not in flight", "EOF inside a reply", "EOF between replies", "ESHUTDOWN" })
        {
            Assert.True(report.Lost.GetValueOrDefault(reason) > CiCases / 100, $"{reason} too rare: {lost}");
        }

        Assert.Equal(6, report.Lost.Keys.Count(k => k != RelayCaseResult.NotDropped));
        Assert.True(report.FromHostile > report.Requests / 10, $"{report.FromHostile} of {report.Requests} from the hostile server");
        Assert.True(report.FromValid > report.Requests / 10, $"{report.FromValid} of {report.Requests} from the valid server");
        Assert.Equal(report.Requests, report.FromHostile + report.FromValid);
        Assert.True(report.HostileErrors > 0);
        Assert.True(report.Reconnects > CiCases / 2, $"{report.Reconnects} reconnects");
        Assert.InRange(report.MaxAllocated, 64 * 1024, report.MaxAllocatedBound);
        Assert.InRange(report.DescriptorGrowth, -16, 16);
        Assert.InRange(report.HeapGrowthBytes, long.MinValue, settings.HeapGrowthBound);
    }

    [Fact]
    public void Run_CiSampleWithDiscAfterTheRequests_EveryWellFormedReplyDeliveredThenEndNeverReconnects()
    {
        // The kernel sends NBD_CMD_DISC after its requests: the relay must deliver exactly the replies the hostile server
        // sent well-formed before its stream went wrong or ended (RelayHarness.WellFormedReplies), then close the
        // kernel's end and end Disconnected, without a reconnect.
        var settings = new FuzzSettings { Seed = 20251205, Cases = CiCases, Mode = FuzzMode.Relay, Parallel = 2, Oracle = RelayOracle.Disconnect };

        var report = new RelayEngine(settings).Run();

        Assert.True(report.Findings.Count == 0, string.Join("\n", report.Findings));
        Assert.Equal(CiCases, report.Cases);
        string ends = string.Join(", ", report.Lost.Select(kv => $"{kv.Key}={kv.Value}"));
        Assert.True(report.Lost.GetValueOrDefault(RelayHarness.EndedAfterDiscAllAnswered) > CiCases / 100, ends);
        Assert.True(report.Lost.GetValueOrDefault(RelayHarness.EndedAfterDiscOwed) > CiCases / 100, ends);
        Assert.Equal(CiCases, report.Lost.GetValueOrDefault(RelayHarness.EndedAfterDiscAllAnswered) + report.Lost.GetValueOrDefault(RelayHarness.EndedAfterDiscOwed));
        Assert.Equal((0L, 0L), (report.FromValid, report.Reconnects));
        Assert.True(report.FromHostile > report.Requests / 10, $"{report.FromHostile} of {report.Requests} from the hostile server");
        Assert.InRange(report.DescriptorGrowth, -16, 16);
        Assert.InRange(report.HeapGrowthBytes, long.MinValue, settings.HeapGrowthBound);
    }

    [Fact]
    public void WellFormedReplies_StreamGoesWrongAfterTwo_CountsTwo()
    {
        var c = new RelayCase(0, 0, Requests, [.. Reply(2), .. Reply(0), .. Reply(1, magic: NbdTransmission.StructuredReplyMagic)], int.MaxValue, "hand-built");

        Assert.Equal(2, RelayHarness.WellFormedReplies(c));
        Assert.Equal(0, RelayHarness.WellFormedReplies(c with { Stream = [.. Reply(0)[..^1]] }));
        Assert.Equal(1, RelayHarness.WellFormedReplies(c with { Stream = [.. Reply(0), .. Reply(0), .. Reply(1)] }));
        Assert.Equal(3, RelayHarness.WellFormedReplies(c with { Stream = [.. Reply(0), .. Reply(1), .. Reply(2), .. Reply(2)] }));
    }

    [Fact]
    public void FirstServer_DiscAfterTwoRequestsAnswered_KernelGetsThoseTwoThenItsEnd()
    {
        var c = new RelayCase(0, 0, Requests, [.. Reply(1), .. Reply(0)], int.MaxValue, "hand-built");

        var result = RelayHarness.Run(c, Deadline, RelayOracle.Disconnect);

        Assert.True(result.Problems.Count == 0, string.Join("\n", result.Problems));
        Assert.Equal((2, 0, 0L), (result.FromHostile, result.FromValid, result.Reconnects));
        Assert.Equal(RelayHarness.EndedAfterDiscOwed, result.Lost);
    }

    // ---- Hand-built first servers: two reads (4096, 512) and a write; the harness checks every reply ----------

    private static readonly RelayRequest[] Requests =
    [
        new(0, NbdCommand.Read, 0, 0x1111, 4096 * 10, 4096, null),
        new(1, NbdCommand.Read, 0, 0x2222, 4096 * 20, 512, null),
        new(2, NbdCommand.Write, 1, 0x3333, RelayDisk.WriteRegion, 1024, Enumerable.Range(0, 1024).Select(i => (byte)i).ToArray()),
    ];

    private static byte[] Reply(int request, uint error = 0, ulong? cookie = null, uint magic = NbdTransmission.SimpleReplyMagic)
    {
        var r = Requests[request];
        return RelayCaseGenerator.Reply(magic, error, cookie ?? r.Cookie, r.Offset, error == 0 ? r.ReplyDataLength : 0);
    }

    private static RelayCaseResult Serve(params byte[][] replies)
    {
        var c = new RelayCase(0, 0, Requests, [.. replies.SelectMany(x => x)], int.MaxValue, "hand-built");
        var result = RelayHarness.Run(c, Deadline);
        Assert.True(result.Problems.Count == 0, string.Join("\n", result.Problems));

        // Measured when the relay dropped the first server; a server that answered everything may still be
        // connected when the kernel has its last reply and the case ends.
        if (result.Lost != RelayCaseResult.NotDropped)
        {
            Assert.InRange(result.HostileAllocated, 1, result.AllocationBound);
        }

        return result;
    }

    [Fact]
    public void FirstServer_AnswersEverything_AllRepliesForwardedNoneResent()
    {
        var result = Serve(Reply(1), Reply(2), Reply(0));

        Assert.Contains(result.Lost, new[] { "EOF between replies", RelayCaseResult.NotDropped });
        Assert.Equal((3, 0), (result.FromHostile, result.FromValid));
    }

    [Fact]
    public void FirstServer_ReplyToCookieNeverSent_DroppedAndAllResent()
    {
        var result = Serve(Reply(0, cookie: 0xdead_beef));

        Assert.Equal("cookie not in flight", result.Lost);
        Assert.Equal((0, 3, 1L), (result.FromHostile, result.FromValid, result.Reconnects));
    }

    [Fact]
    public void FirstServer_StructuredReply_DroppedAfterTheSimpleOnes()
    {
        byte[] structured = Reply(1, magic: NbdTransmission.StructuredReplyMagic);

        var result = Serve(Reply(2), structured, Reply(0));

        Assert.Equal("structured reply", result.Lost);
        Assert.Contains("never negotiated", result.LostDetail, StringComparison.Ordinal);
        Assert.Equal((1, 2), (result.FromHostile, result.FromValid));
    }

    [Fact]
    public void FirstServer_DuplicatedReply_SecondCopyDropsItAndKernelGetsOne()
    {
        var result = Serve(Reply(0), Reply(0), Reply(1), Reply(2));

        Assert.Equal("cookie not in flight", result.Lost);
        Assert.Equal((1, 2), (result.FromHostile, result.FromValid));
    }

    [Theory]
    [InlineData(0)]      // EOF right after the header
    [InlineData(1)]
    [InlineData(4095)]   // one byte short
    public void FirstServer_EofInsideReadData_NothingOfItForwardedReadResent(int dataBytes)
    {
        byte[] partial = Reply(0)[..(NbdTransmission.SimpleReplyLength + dataBytes)];

        var result = Serve(Reply(1), partial);

        Assert.Equal("EOF inside a reply", result.Lost);
        Assert.Equal((1, 2), (result.FromHostile, result.FromValid)); // the read came again, whole, from the valid server
    }

    [Fact]
    public void FirstServer_ReadErrorWithoutData_ForwardedAsTheServersWord()
    {
        var result = Serve(Reply(0, error: 5), Reply(1), Reply(2, error: 28));

        Assert.Contains(result.Lost, new[] { "EOF between replies", RelayCaseResult.NotDropped });
        Assert.Equal((3, 2, 0), (result.FromHostile, result.HostileErrors, result.FromValid));
    }

    [Fact]
    public void FirstServer_ReadErrorFollowedByItsData_DataParsedAsNextHeaderDropsIt()
    {
        // A server that sends data after an error: the relay takes the length from the request and the error from the
        // server, so the data is read as the next header (bad magic) and everything still unanswered is resent.
        byte[] errorWithData = Reply(0);
        BinaryPrimitives.WriteUInt32BigEndian(errorWithData.AsSpan(4), 5);

        var result = Serve(errorWithData, Reply(1), Reply(2));

        Assert.Equal("bad reply magic", result.Lost);
        Assert.Equal((1, 1, 2), (result.FromHostile, result.HostileErrors, result.FromValid));
    }

    [Fact]
    public void FirstServer_OnlyResentRequests_ReachTheValidServerInTheKernelsOrder()
    {
        // Reply 1 only: 0 and 2 are resent; the valid server checks bytes (write data included) and order.
        var result = Serve(Reply(1), Reply(1));

        Assert.Equal((1, 2), (result.FromHostile, result.FromValid));
    }

    [Theory]
    [InlineData(256 * 1024)]
    [InlineData(1024 * 1024)]
    public void Resend_ReadAheadOfWrite_OneRequestAtATimeServerAnswersBoth(int length)
    {
        // The first server closes at once with both in flight. The valid server writes the read's reply before it
        // reads the write; once the socket buffers (about 208 KiB each) are full it waits for the relay to read,
        // while the relay is still resending the write (found as case 5:2788; fixed in b9873fb: resend on its own thread).
        RelayRequest[] requests =
        [
            new(0, NbdCommand.Read, 0, 1, 0, (uint)length, null),
            new(1, NbdCommand.Write, 0, 2, RelayDisk.WriteRegion, (uint)length, new byte[length]),
        ];

        var result = RelayHarness.Run(new RelayCase(0, 0, requests, [], int.MaxValue, "EOF at once"), TimeSpan.FromSeconds(5), RelayOracle.Sequential);

        Assert.True(result.Problems.Count == 0, string.Join("\n", result.Problems));
        Assert.Equal((0, 2, 1L), (result.FromHostile, result.FromValid, result.Reconnects));
    }

    // ---- Generator, replay, arguments -----------------------------------------------------------------------------

    [Fact]
    public void Generator_SameSeedAndIndex_SameRequestsAndStream()
    {
        var a = RelayCaseGenerator.Build(77, 123_456);
        var b = RelayCaseGenerator.Build(77, 123_456, describe: true);
        var other = RelayCaseGenerator.Build(77, 123_457);

        Assert.Equal(a.Stream, b.Stream);
        Assert.Equal(a.Requests.Select(r => Convert.ToHexString(r.Header())), b.Requests.Select(r => Convert.ToHexString(r.Header())));
        Assert.Equal(a.MaxChunk, b.MaxChunk);
        Assert.NotEqual(a.Stream, other.Stream);
        Assert.NotEmpty(b.Description);
    }

    [Fact]
    public void Replay_RelayCase_PrintsRequestsStreamAndWhatTheRelayDid()
    {
        using var output = new StringWriter();

        int exit = RelayReplay.Run("1:7", new FuzzSettings { Mode = FuzzMode.Relay }, output);

        string text = output.ToString();
        Assert.True(exit == 0, text);
        Assert.Contains("case 1:7: relay", text, StringComparison.Ordinal);
        Assert.Contains("  #0 ", text, StringComparison.Ordinal);
        Assert.Contains("hex: ", text, StringComparison.Ordinal);
        Assert.Contains("dropped because: ", text, StringComparison.Ordinal);
        Assert.Contains("from the valid server", text, StringComparison.Ordinal);
    }

    [Fact]
    public void Arguments_RelayModeAndOracle_Parsed()
    {
        var (settings, replay) = Arguments.Parse(["--mode", "relay", "--oracle", "pipelined", "--replay", "3:4"]);

        Assert.Equal(FuzzMode.Relay, settings.Mode);
        Assert.Equal(RelayOracle.Pipelined, settings.Oracle);
        Assert.Equal(RelayOracle.Sequential, new FuzzSettings().Oracle);
        Assert.Equal("3:4", replay);
        Assert.Throws<FormatException>(() => Arguments.Parse(["--oracle", "lazy"]));
    }

    [Fact]
    public void Findings_ProblemOfACase_ReplayHintCarriesModeAndOracle()
    {
        var c = RelayCaseGenerator.Build(5, 2788);
        var result = new RelayCaseResult();
        result.Problems.Add((FindingKind.Hang, "no reply"));

        var pipelined = Assert.Single(RelayEngine.Findings(c, result, RelayOracle.Pipelined));
        var sequential = Assert.Single(RelayEngine.Findings(c, result, RelayOracle.Sequential));

        Assert.EndsWith("(replay: --replay 5:2788 --mode relay)", sequential.ToString(), StringComparison.Ordinal);
        Assert.EndsWith("(replay: --replay 5:2788 --mode relay --oracle pipelined)", pipelined.ToString(), StringComparison.Ordinal);
    }

    [Fact]
    public void AllMode_StillAlternatesHandshakeAndReconnect_RelayNotMixedIn()
    {
        Assert.False(CaseGenerator.IsReconnect(FuzzMode.All, 10));
        Assert.True(CaseGenerator.IsReconnect(FuzzMode.All, 11));
        Assert.Throws<ArgumentOutOfRangeException>(() => CaseGenerator.IsReconnect(FuzzMode.Relay, 1));
    }
}

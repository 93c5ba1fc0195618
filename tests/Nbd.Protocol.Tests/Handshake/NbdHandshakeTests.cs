using Nbd.Protocol.Tests.TestSupport;
using static Nbd.Protocol.Tests.TestSupport.ClientBytes;

namespace Nbd.Protocol.Tests.Handshake;

/// <summary>The whole handshake against scripted servers: what the client sends and how it reads every answer.</summary>
public sealed class NbdHandshakeTests
{
    private static readonly NbdUri Disk = NbdUri.Parse("nbd://server.test/disk");
    private static readonly NbdClientOptions Options = new() { HandshakeTimeout = TimeSpan.FromSeconds(5) };
    private const TransmissionFlags Rw = TransmissionFlags.HasFlags | TransmissionFlags.SendFlush | TransmissionFlags.SendTrim;

    private static async Task<(NbdExportInfo Info, ScriptedStream Stream)> GoAsync(ServerScript server, NbdUri? uri = null)
    {
        var stream = new ScriptedStream(server.ToArray());
        var info = await NbdClient.NegotiateAsync(stream, uri ?? Disk, Options, CancellationToken.None);
        return (info, stream);
    }

    private static async Task<(T Exception, ScriptedStream Stream)> FailAsync<T>(ServerScript server, Func<Stream, Task>? run = null)
        where T : Exception
    {
        var stream = new ScriptedStream(server.ToArray());
        run ??= s => NbdClient.NegotiateAsync(s, Disk, Options, CancellationToken.None);
        var ex = await Assert.ThrowsAnyAsync<T>(() => run(stream));
        return (ex, stream);
    }

    [Fact]
    public async Task Go_FixedNewstyle_ReturnsExportAndSendsExactBytes()
    {
        var server = ServerScript.Newstyle(3)
            .InfoExport(NbdOption.Go, 1UL << 30, Rw)
            .InfoBlockSize(NbdOption.Go, 512, 4096, 1 << 25)
            .InfoString(NbdOption.Go, 1, "canonical")
            .InfoString(NbdOption.Go, 2, "A test disk")
            .Ack(NbdOption.Go);

        var (info, stream) = await GoAsync(server);

        Assert.Equal(new NbdExportInfo("canonical", 1UL << 30, Rw, new BlockSizeConstraints(512, 4096, 1 << 25), "A test disk"), info);
        Assert.Equal(Concat(Flags(3), Go("disk")), stream.Written);
        Assert.Equal(server.Length, stream.BytesRead); // nothing of transmission consumed
    }

    [Fact]
    public async Task Go_OnlyExportInfo_NameFromRequestAndNoBlockSizes()
    {
        var (info, _) = await GoAsync(ServerScript.Newstyle(1).InfoExport(NbdOption.Go, 4096, TransmissionFlags.HasFlags).Ack(NbdOption.Go));

        Assert.Equal(new NbdExportInfo("disk", 4096, TransmissionFlags.HasFlags, null, null), info);
    }

    /// <summary>
    /// proto.md: NBD_FLAG_HAS_FLAGS "MUST always be 1"; all-zero flags are refused, as libnbd refuses them. A server
    /// that answered the fallback NBD_OPT_EXPORT_NAME with
    /// option-reply bytes had them taken as an export of 0x3e889045565a9 bytes (1.1 PB) and flags 0, and the daemon
    /// went on to configure the kernel with it.
    /// </summary>
    [Fact]
    public async Task Go_TransmissionFlagsWithoutHasFlags_RefusedAsNoExportsDescription()
    {
        var (info, _) = await FailAsync<NbdProtocolException>(ServerScript.Newstyle(1).InfoExport(NbdOption.Go, 4096, TransmissionFlags.None).Ack(NbdOption.Go));
        Assert.Equal(NbdProtocolError.InvalidValue, info.Error);
        Assert.Equal("NBD_INFO_EXPORT has transmission flags 0x0000, without NBD_FLAG_HAS_FLAGS, which proto.md requires: not an export's description.", info.Detail);

        // Other flags without the bit are taken, as libnbd takes them.
        var (lenient, _) = await GoAsync(ServerScript.Newstyle(1).InfoExport(NbdOption.Go, 4096, TransmissionFlags.SendFlush).Ack(NbdOption.Go));
        Assert.Equal(TransmissionFlags.SendFlush, lenient.Flags);

        // The fallback, with option-reply bytes where the export should be: magic 0x0003e889045565a9, then option 1.
        var (fallback, _) = await FailAsync<NbdProtocolException>(
            ServerScript.Newstyle(3).Error(NbdOption.Go, NbdReplyType.ErrUnsup).Reply(NbdOption.ExportName, NbdReplyType.Ack, []));
        Assert.Equal(NbdProtocolError.InvalidValue, fallback.Error);
        Assert.StartsWith("NBD_OPT_EXPORT_NAME reply has transmission flags 0x0000, without NBD_FLAG_HAS_FLAGS", fallback.Detail, StringComparison.Ordinal);
    }

    /// <summary>Servers from before the flags field sent zeroes there; the oldstyle handshake is not checked.</summary>
    [Fact]
    public async Task Go_OldstyleWithoutFlags_Accepted()
    {
        var (info, _) = await GoAsync(ServerScript.Oldstyle(1UL << 30, 0), NbdUri.Parse("nbd://server.test"));
        Assert.Equal(new NbdExportInfo("", 1UL << 30, TransmissionFlags.None, null, null), info);
    }

    [Fact]
    public async Task Go_ServerFlagsWithoutNoZeroes_ClientSendsOnlyFixedNewstyle()
    {
        var (_, stream) = await GoAsync(ServerScript.Newstyle(1).InfoExport(NbdOption.Go, 1, TransmissionFlags.HasFlags).Ack(NbdOption.Go));

        Assert.Equal(Concat(Flags(1), Go("disk")), stream.Written);
    }

    [Theory]
    [InlineData((ushort)3, false)]
    [InlineData((ushort)1, true)]
    public async Task Go_Unsup_FallsBackToExportName(ushort handshakeFlags, bool zeroes)
    {
        var server = ServerScript.Newstyle(handshakeFlags)
            .Error(NbdOption.Go, NbdReplyType.ErrUnsup, "what is GO?")
            .ExportNameReply(123456, Rw, zeroes);

        var (info, stream) = await GoAsync(server);

        Assert.Equal(new NbdExportInfo("disk", 123456, Rw, null, null), info);
        Assert.Equal(Concat(Flags(handshakeFlags), Go("disk"), Option(NbdOption.ExportName, "disk"u8.ToArray())), stream.Written);
        Assert.Equal(server.Length, stream.BytesRead);
    }

    [Fact]
    public async Task Go_FallbackWithoutNoZeroes_MissingReservedBytes_Truncated()
    {
        var server = ServerScript.Newstyle(1).Error(NbdOption.Go, NbdReplyType.ErrUnsup).ExportNameReply(1, Rw, zeroes: false);

        var (ex, _) = await FailAsync<NbdProtocolException>(server);

        Assert.Equal(NbdProtocolError.Truncated, ex.Error);
        Assert.Contains("124 reserved bytes", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Go_FallbackServerClosesAfterExportName_TruncatedSaysExportMissing()
    {
        var (ex, _) = await FailAsync<NbdProtocolException>(ServerScript.Newstyle(3).Error(NbdOption.Go, NbdReplyType.ErrUnsup));

        Assert.Equal(NbdProtocolError.Truncated, ex.Error);
        Assert.Contains("probably does not exist", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Go_NonFixedNewstyle_SendsExportNameDirectly()
    {
        var server = ServerScript.Newstyle(0).ExportNameReply(777, TransmissionFlags.HasFlags, zeroes: true);

        var (info, stream) = await GoAsync(server);

        Assert.Equal(new NbdExportInfo("disk", 777, TransmissionFlags.HasFlags, null, null), info);
        Assert.Equal(Concat(Flags(0), Option(NbdOption.ExportName, "disk"u8.ToArray())), stream.Written);
    }

    [Fact]
    public async Task Go_NonFixedNewstyleWithNoZeroes_NoReservedBytesExpected()
    {
        var (info, stream) = await GoAsync(ServerScript.Newstyle(2).ExportNameReply(5, TransmissionFlags.HasFlags, zeroes: false));

        Assert.Equal(5UL, info.Size);
        Assert.Equal(Concat(Flags(2), Option(NbdOption.ExportName, "disk"u8.ToArray())), stream.Written);
    }

    [Fact]
    public async Task Go_Oldstyle_ReadsGreetingAndSendsNothing()
    {
        var server = ServerScript.Oldstyle(1UL << 40, 0x0001_0003);

        var (info, stream) = await GoAsync(server, NbdUri.Parse("nbd://server.test"));

        Assert.Equal(new NbdExportInfo("", 1UL << 40, TransmissionFlags.HasFlags | TransmissionFlags.ReadOnly, null, null), info);
        Assert.Empty(stream.Written);
        Assert.Equal(152, stream.BytesRead);
    }

    [Fact]
    public async Task Go_OldstyleWithAnExportNameAsked_RefusedInsteadOfServingItsOnlyExportUnderThatName()
    {
        // An oldstyle server cannot be told which export: nbd://server.test/disk would map whatever it serves.
        var ex = await Assert.ThrowsAsync<NbdProtocolException>(() => GoAsync(ServerScript.Oldstyle(1UL << 40, 0x0001_0003)));

        Assert.Equal(NbdProtocolError.Unsupported, ex.Error);
        Assert.Contains("oldstyle", ex.Message, StringComparison.Ordinal);
        Assert.Contains("'disk'", ex.Message, StringComparison.Ordinal);
    }

    public static TheoryData<NbdReplyType> ErrorCodes() =>
    [
        NbdReplyType.ErrUnsup, NbdReplyType.ErrPolicy, NbdReplyType.ErrInvalid, NbdReplyType.ErrPlatform,
        NbdReplyType.ErrTlsReqd, NbdReplyType.ErrUnknown, NbdReplyType.ErrShutdown, NbdReplyType.ErrBlockSizeReqd,
        NbdReplyType.ErrTooBig, NbdReplyType.ErrExtHeaderReqd, (NbdReplyType)0x8000_0042,
    ];

    [Theory]
    [MemberData(nameof(ErrorCodes))]
    public async Task Info_ErrorReply_TypedWithCodeMessageAndSoftDisconnect(NbdReplyType code)
    {
        var server = ServerScript.Newstyle(3).Error(NbdOption.Info, code, "go away");

        var (ex, stream) = await FailAsync<NbdServerErrorException>(server,
            s => NbdClient.NegotiateInfoAsync(s, Disk, Options, CancellationToken.None));

        Assert.Equal(code, ex.ReplyType);
        Assert.Equal(NbdOption.Info, ex.Option);
        Assert.Equal("go away", ex.ServerMessage);
        Assert.Equal(code == NbdReplyType.ErrTlsReqd, ex is NbdTlsRequiredException);
        Assert.Contains("go away", ex.Message, StringComparison.Ordinal);
        Assert.Equal("server.test:10809", ex.Server);
        Assert.Equal("disk", ex.ExportName);
        Assert.Equal(Concat(Flags(3), Info("disk"), Option(NbdOption.Abort)), stream.Written);
    }

    [Theory]
    [MemberData(nameof(ErrorCodes))]
    public async Task Go_ErrorReplyOtherThanUnsup_TypedError(NbdReplyType code)
    {
        if (code == NbdReplyType.ErrUnsup)
        {
            return; // covered by Go_Unsup_FallsBackToExportName: UNSUP to GO is not an error
        }

        // Some INFO replies first: errors may follow any number of them.
        var server = ServerScript.Newstyle(3).InfoExport(NbdOption.Go, 1, Rw).Error(NbdOption.Go, code);

        var (ex, stream) = await FailAsync<NbdServerErrorException>(server);

        Assert.Equal(code, ex.ReplyType);
        Assert.Null(ex.ServerMessage);
        Assert.Equal(Concat(Flags(3), Go("disk"), Option(NbdOption.Abort)), stream.Written);
    }

    [Fact]
    public async Task Go_TlsRequired_NbdTlsRequiredException()
    {
        var (ex, _) = await FailAsync<NbdTlsRequiredException>(ServerScript.Newstyle(3).Error(NbdOption.Go, NbdReplyType.ErrTlsReqd, "TLS please"));

        Assert.Equal(NbdReplyType.ErrTlsReqd, ex.ReplyType);
        Assert.Equal("TLS please", ex.ServerMessage);
    }

    [Fact]
    public async Task List_TwoExports_ThenAbortAcked()
    {
        var server = ServerScript.Newstyle(3).Server("a").Server("b", "second disk").Ack(NbdOption.List).Ack(NbdOption.Abort);
        var stream = new ScriptedStream(server.ToArray());

        var list = await NbdClient.NegotiateListAsync(stream, Disk, Options, CancellationToken.None);

        Assert.Equal([new NbdExportListing("a", null), new NbdExportListing("b", "second disk")], list);
        Assert.Equal(Concat(Flags(3), Option(NbdOption.List), Option(NbdOption.Abort)), stream.Written);
        Assert.Equal(server.Length, stream.BytesRead);
    }

    [Fact]
    public async Task List_ServerClosesInsteadOfAbortAck_StillSucceeds()
    {
        var stream = new ScriptedStream(ServerScript.Newstyle(3).Ack(NbdOption.List).ToArray());

        var list = await NbdClient.NegotiateListAsync(stream, Disk, Options, CancellationToken.None);

        Assert.Empty(list);
    }

    /// <summary>It said "Server announced a 4294967280-byte reply 0x00000001 reply to NBD_OPT_LIST; at most 0 is accepted."</summary>
    [Theory]
    [InlineData(NbdReplyType.Ack, 0xFFFF_FFF0u, "Server sent NBD_REP_ACK to NBD_OPT_LIST with 4294967280 bytes of data; it carries none.")]
    [InlineData(NbdReplyType.Server, 0xFFFF_FFF0u, "Server announced 4294967280 bytes of NBD_REP_SERVER data for NBD_OPT_LIST; at most ")]
    public async Task List_OversizedReplyLength_NamesTheReplyAndTheLimit(NbdReplyType type, uint length, string expected)
    {
        var server = ServerScript.Newstyle(3).U64(ServerScript.ReplyMagic).U32((uint)NbdOption.List).U32((uint)type).U32(length);
        var stream = new ScriptedStream(server.ToArray());

        var ex = await Assert.ThrowsAsync<NbdProtocolException>(() => NbdClient.NegotiateListAsync(stream, Disk, Options, CancellationToken.None));

        Assert.Equal(NbdProtocolError.OversizedLength, ex.Error);
        Assert.StartsWith(expected, ex.Detail, StringComparison.Ordinal);
    }

    [Fact]
    public async Task List_MoreThanMaxEntries_OversizedLength()
    {
        var server = ServerScript.Newstyle(3).Server("a").Server("b").Server("c").Server("d").Ack(NbdOption.List);
        var stream = new ScriptedStream(server.ToArray());

        var ex = await Assert.ThrowsAsync<NbdProtocolException>(() =>
            NbdClient.NegotiateListAsync(stream, Disk, new NbdClientOptions { MaxListEntries = 3 }, CancellationToken.None));

        Assert.Equal(NbdProtocolError.OversizedLength, ex.Error);
    }

    [Fact]
    public async Task List_ManyMaximalEntries_OversizedLengthBeforeHoldingTooMuch()
    {
        // 2100 replies of 8196 bytes = 17.2 MB > 16 MiB total; each reply alone is within its bound.
        var server = ServerScript.Newstyle(3);
        for (int i = 0; i < 2100; i++)
        {
            server.Server(new string('n', 4096), new string('d', 4096));
        }

        var stream = new ScriptedStream(server.Ack(NbdOption.List).ToArray());

        var ex = await Assert.ThrowsAsync<NbdProtocolException>(() => NbdClient.NegotiateListAsync(stream, Disk, Options, CancellationToken.None));

        Assert.Equal(NbdProtocolError.OversizedLength, ex.Error);
        Assert.Contains("export list exceeds", ex.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData((ushort)0)]
    public async Task List_NonFixedNewstyle_Unsupported(ushort flags)
    {
        var (ex, _) = await FailAsync<NbdProtocolException>(ServerScript.Newstyle(flags),
            s => NbdClient.NegotiateListAsync(s, Disk, Options, CancellationToken.None));

        Assert.Equal(NbdProtocolError.Unsupported, ex.Error);
    }

    [Fact]
    public async Task List_Oldstyle_Unsupported()
    {
        var (ex, _) = await FailAsync<NbdProtocolException>(ServerScript.Oldstyle(1, 1),
            s => NbdClient.NegotiateListAsync(s, Disk, Options, CancellationToken.None));

        Assert.Equal(NbdProtocolError.Unsupported, ex.Error);
    }

    [Fact]
    public async Task Info_Success_ThenAbort()
    {
        var server = ServerScript.Newstyle(3).InfoExport(NbdOption.Info, 42, Rw).InfoString(NbdOption.Info, 2, "desc").Ack(NbdOption.Info).Ack(NbdOption.Abort);
        var stream = new ScriptedStream(server.ToArray());

        var info = await NbdClient.NegotiateInfoAsync(stream, Disk, Options, CancellationToken.None);

        Assert.Equal(new NbdExportInfo("disk", 42, Rw, null, "desc"), info);
        Assert.Equal(Concat(Flags(3), Info("disk"), Option(NbdOption.Abort)), stream.Written);
    }

    [Fact]
    public async Task Tls_ServerAcceptsStartTls_NotSupportedAfterAck()
    {
        var (ex, stream) = await FailAsync<NbdTlsNotSupportedException>(ServerScript.Newstyle(3).Ack(NbdOption.StartTls),
            s => NbdClient.NegotiateAsync(s, NbdUri.Parse("nbds://server.test/disk"), Options, CancellationToken.None));

        Assert.True(ex.ServerAcceptedStartTls);
        Assert.Equal(Concat(Flags(3), Option(NbdOption.StartTls)), stream.Written); // hard disconnect: no ABORT after ACK
    }

    [Fact]
    public async Task Tls_ServerRefusesStartTls_NotSupportedWithServerError()
    {
        var (ex, stream) = await FailAsync<NbdTlsNotSupportedException>(ServerScript.Newstyle(3).Error(NbdOption.StartTls, NbdReplyType.ErrPolicy, "no TLS here"),
            s => NbdClient.NegotiateAsync(s, NbdUri.Parse("nbds+unix:///disk?socket=/x"), Options, CancellationToken.None));

        Assert.False(ex.ServerAcceptedStartTls);
        Assert.Equal(NbdReplyType.ErrPolicy, Assert.IsType<NbdServerErrorException>(ex.InnerException).ReplyType);
        Assert.Equal(Concat(Flags(3), Option(NbdOption.StartTls), Option(NbdOption.Abort)), stream.Written);
    }

    [Fact]
    public async Task Tls_NonFixedNewstyleServer_NotSupportedWithoutSendingOptions()
    {
        var (ex, stream) = await FailAsync<NbdTlsNotSupportedException>(ServerScript.Newstyle(0),
            s => NbdClient.NegotiateAsync(s, NbdUri.Parse("nbds://h/disk"), Options, CancellationToken.None));

        Assert.False(ex.ServerAcceptedStartTls);
        Assert.Equal(Flags(0), stream.Written);
    }

    public static TheoryData<string, byte[], NbdProtocolError> Violations()
    {
        var data = new TheoryData<string, byte[], NbdProtocolError>
        {
            { "bad first magic", new ServerScript().U64(0x4e42444d41474944).U64(ServerScript.IHaveOpt).U16(3).ToArray(), NbdProtocolError.BadMagic },
            { "bad second magic", new ServerScript().U64(ServerScript.NbdMagic).U64(0x1234).U16(3).ToArray(), NbdProtocolError.BadMagic },
            { "bad reply magic", ServerScript.Newstyle().U64(0x3e889045565a8).U32(7).U32(1).U32(0).ToArray(), NbdProtocolError.BadMagic },
            { "option echo mismatch", ServerScript.Newstyle().Ack(NbdOption.Info).ToArray(), NbdProtocolError.UnexpectedReply },
            { "SERVER reply to GO", ServerScript.Newstyle().Reply(NbdOption.Go, NbdReplyType.Server, [0, 0, 0, 0]).ToArray(), NbdProtocolError.UnexpectedReply },
            { "unknown non-error reply type", ServerScript.Newstyle().Reply(NbdOption.Go, (NbdReplyType)77).ToArray(), NbdProtocolError.UnexpectedReply },
            { "ACK without INFO_EXPORT", ServerScript.Newstyle().Ack(NbdOption.Go).ToArray(), NbdProtocolError.UnexpectedReply },
            { "ACK with payload", ServerScript.Newstyle().Reply(NbdOption.Go, NbdReplyType.Ack, [1]).ToArray(), NbdProtocolError.OversizedLength },
            { "INFO 4 GiB", ServerScript.Newstyle().U64(ServerScript.ReplyMagic).U32(7).U32(3).U32(0xFFFF_FFFF).ToArray(), NbdProtocolError.OversizedLength },
            { "INFO 64 KiB + 1", ServerScript.Newstyle().U64(ServerScript.ReplyMagic).U32(7).U32(3).U32(65537).ToArray(), NbdProtocolError.OversizedLength },
            { "error message 4097", ServerScript.Newstyle().U64(ServerScript.ReplyMagic).U32(7).U32(0x8000_0002).U32(4097).ToArray(), NbdProtocolError.OversizedLength },
            { "INFO_EXPORT length 11", ServerScript.Newstyle().Reply(NbdOption.Go, NbdReplyType.Info, new byte[11]).ToArray(), NbdProtocolError.InvalidValue },
            { "INFO without type", ServerScript.Newstyle().Reply(NbdOption.Go, NbdReplyType.Info, new byte[1]).ToArray(), NbdProtocolError.InvalidValue },
            { "bad block sizes", ServerScript.Newstyle().InfoBlockSize(NbdOption.Go, 3, 512, 512).ToArray(), NbdProtocolError.InvalidValue },
            { "empty stream", [], NbdProtocolError.Truncated },
        };
        return data;
    }

    [Theory]
    [MemberData(nameof(Violations))]
    public async Task Go_ProtocolViolation_TypedError(string because, byte[] server, NbdProtocolError error)
    {
        var stream = new ScriptedStream(server);

        var ex = await Assert.ThrowsAsync<NbdProtocolException>(() => NbdClient.NegotiateAsync(stream, Disk, Options, CancellationToken.None));

        Assert.True(error == ex.Error, $"{because}: expected {error}, got {ex.Error}: {ex.Message}");
        Assert.Equal("server.test:10809", ex.Server);
    }

    [Fact]
    public void Go_Announces4GiBReply_RefusedWithoutAllocating()
    {
        var server = ServerScript.Newstyle().U64(ServerScript.ReplyMagic).U32(7).U32(3).U32(0xFFFF_FFFF).Zeroes(1024).ToArray();
        var stream = new ScriptedStream(server);
        long before = GC.GetAllocatedBytesForCurrentThread();

        var task = NbdClient.NegotiateAsync(stream, Disk, Options, CancellationToken.None);

        // ScriptedStream completes synchronously, so the whole handshake ran on this thread.
        Assert.True(task.IsCompleted);
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        var ex = Assert.IsType<NbdProtocolException>(task.Exception!.InnerException);
        Assert.Equal(NbdProtocolError.OversizedLength, ex.Error);
        Assert.Equal(18 + 20, stream.BytesRead); // greeting + reply header; the payload was never touched
        Assert.True(allocated < 256 * 1024, $"allocated {allocated} bytes");
    }

    public static TheoryData<string, byte[], int> ValidStreams() => new()
    {
        { "GO", ServerScript.Newstyle(3).InfoExport(NbdOption.Go, 1, Rw).InfoBlockSize(NbdOption.Go, 1, 4096, 65536).InfoString(NbdOption.Go, 1, "n").Ack(NbdOption.Go).ToArray(), 0 },
        { "fallback", ServerScript.Newstyle(1).Error(NbdOption.Go, NbdReplyType.ErrUnsup, "x").ExportNameReply(9, Rw, zeroes: true).ToArray(), 0 },
        { "oldstyle", ServerScript.Oldstyle(9, 1).ToArray(), 3 }, // GO for the empty name: the only one oldstyle serves
        { "newstyle", ServerScript.Newstyle(0).ExportNameReply(9, Rw, zeroes: true).ToArray(), 0 },
        { "list", ServerScript.Newstyle(3).Server("a", "b").Server("c").Ack(NbdOption.List).ToArray(), 1 },
        { "info", ServerScript.Newstyle(3).InfoExport(NbdOption.Info, 1, Rw).InfoString(NbdOption.Info, 2, "d").Ack(NbdOption.Info).ToArray(), 2 },
    };

    [Theory]
    [MemberData(nameof(ValidStreams))]
    public async Task AnyPrefix_OfValidStream_Truncated(string name, byte[] server, int kind)
    {
        // The full stream succeeds ...
        await Run(new ScriptedStream(server));

        // ... and every strict prefix (cut inside or between fields) is a Truncated error, never a hang.
        for (int cut = 0; cut < server.Length; cut++)
        {
            var ex = await Assert.ThrowsAsync<NbdProtocolException>(() => Run(new ScriptedStream(server[..cut])));
            Assert.True(ex.Error == NbdProtocolError.Truncated, $"{name} cut at {cut}: {ex.Error} {ex.Message}");
        }

        Task Run(ScriptedStream s) => kind switch
        {
            0 => NbdClient.NegotiateAsync(s, Disk, Options, CancellationToken.None),
            1 => NbdClient.NegotiateListAsync(s, Disk, Options, CancellationToken.None),
            3 => NbdClient.NegotiateAsync(s, NbdUri.Parse("nbd://server.test"), Options, CancellationToken.None),
            _ => NbdClient.NegotiateInfoAsync(s, Disk, Options, CancellationToken.None),
        };
    }

    [Fact]
    public async Task Go_ServerSendsOneByteAtATime_StillParses()
    {
        var server = ServerScript.Newstyle(3).InfoExport(NbdOption.Go, 99, Rw).Ack(NbdOption.Go).ToArray();

        var info = await NbdClient.NegotiateAsync(new ScriptedStream(server, maxChunk: 1), Disk, Options, CancellationToken.None);

        Assert.Equal(99UL, info.Size);
    }
}

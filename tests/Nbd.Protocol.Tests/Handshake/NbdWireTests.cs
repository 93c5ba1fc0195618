namespace Nbd.Protocol.Tests.Handshake;

/// <summary>Every message the client sends and every reply it parses, as bytes.</summary>
public sealed class NbdWireTests
{
    private static byte[] Hex(string hex) => Convert.FromHexString(hex.Replace(" ", "", StringComparison.Ordinal));

    [Theory]
    [InlineData("4e42444d41474943 49484156454f5054", true)]
    [InlineData("4e42444d41474943 0000420281861253", false)]
    public void ParseGreeting_KnownMagic_ReturnsStyle(string hex, bool newstyle) =>
        Assert.Equal(newstyle, NbdWire.ParseGreeting(Hex(hex)));

    [Theory]
    [InlineData("4e42444d41474944 49484156454f5054")]
    [InlineData("0000000000000000 0000000000000000")]
    [InlineData("4e42444d41474943 49484156454f5055")]
    public void ParseGreeting_WrongMagic_ThrowsBadMagic(string hex)
    {
        var ex = Assert.Throws<NbdProtocolException>(() => NbdWire.ParseGreeting(Hex(hex)));
        Assert.Equal(NbdProtocolError.BadMagic, ex.Error);
    }

    [Theory]
    [InlineData(0x0000, 0x0000_0000)]
    [InlineData(0x0001, 0x0000_0001)]
    [InlineData(0x0002, 0x0000_0002)]
    [InlineData(0x0003, 0x0000_0003)]
    [InlineData(0xFFFF, 0x0000_0003)] // unknown server flags are ignored, never echoed
    public void ChooseClientFlags_EchoesOnlyKnownFlags(int server, int expected) =>
        Assert.Equal((uint)expected, (uint)NbdWire.ChooseClientFlags((HandshakeFlags)server));

    [Fact]
    public void WriteClientFlags_BigEndian()
    {
        var b = new byte[4];
        NbdWire.WriteClientFlags(b, ClientFlags.FixedNewstyle | ClientFlags.NoZeroes);
        Assert.Equal(Hex("00000003"), b);
    }

    [Fact]
    public void ParseOldstyleRest_ReadsSizeAndLow16BitsOfFlags()
    {
        var rest = Hex("0000000040000000 00010003" + new string('0', 248));
        var (size, flags) = NbdWire.ParseOldstyleRest(rest);
        Assert.Equal(0x40000000UL, size);
        Assert.Equal(TransmissionFlags.HasFlags | TransmissionFlags.ReadOnly, flags);
    }

    [Theory]
    [InlineData(NbdOption.Abort, "49484156454f5054 00000002 00000000")]
    [InlineData(NbdOption.List, "49484156454f5054 00000003 00000000")]
    [InlineData(NbdOption.StartTls, "49484156454f5054 00000005 00000000")]
    public void BuildOption_NoData(NbdOption option, string hex) =>
        Assert.Equal(Hex(hex), NbdWire.BuildOption(option, []));

    [Theory]
    [InlineData("disk", "49484156454f5054 00000001 00000004 6469736b")]
    [InlineData("", "49484156454f5054 00000001 00000000")]
    [InlineData("é", "49484156454f5054 00000001 00000002 c3a9")]
    public void BuildExportName_NameIsWholeData(string name, string hex) =>
        Assert.Equal(Hex(hex), NbdWire.BuildExportName(name));

    [Fact]
    public void BuildInfoRequest_Go_ExportAndBlockSize() =>
        Assert.Equal(
            Hex("49484156454f5054 00000007 0000000e 00000004 6469736b 0002 0000 0003"),
            NbdWire.BuildInfoRequest(NbdOption.Go, "disk", [NbdInfoType.Export, NbdInfoType.BlockSize]));

    [Fact]
    public void BuildInfoRequest_InfoDefaultExport_FourRequests() =>
        Assert.Equal(
            Hex("49484156454f5054 00000006 0000000e 00000000 0004 0000 0003 0001 0002"),
            NbdWire.BuildInfoRequest(NbdOption.Info, "", [NbdInfoType.Export, NbdInfoType.BlockSize, NbdInfoType.Name, NbdInfoType.Description]));

    [Fact]
    public void BuildExportName_TooLongOrNul_Throws()
    {
        Assert.Throws<ArgumentException>(() => NbdWire.BuildExportName(new string('x', 4097)));
        Assert.Throws<ArgumentException>(() => NbdWire.BuildExportName("a\0b"));
    }

    [Theory]
    [InlineData("0003e889045565a9 00000007 00000001 00000000", NbdOption.Go, NbdReplyType.Ack, 0u)]
    [InlineData("0003e889045565a9 00000003 00000002 0000000c", NbdOption.List, NbdReplyType.Server, 12u)]
    [InlineData("0003e889045565a9 00000006 80000005 ffffffff", NbdOption.Info, NbdReplyType.ErrTlsReqd, 0xffffffffu)]
    public void ParseOptionReplyHeader_Fields(string hex, NbdOption option, NbdReplyType type, uint length) =>
        Assert.Equal(new NbdWire.OptionReplyHeader(option, type, length), NbdWire.ParseOptionReplyHeader(Hex(hex)));

    [Fact]
    public void ParseOptionReplyHeader_BadMagic_Throws()
    {
        var ex = Assert.Throws<NbdProtocolException>(() => NbdWire.ParseOptionReplyHeader(Hex("0003e889045565aa 00000007 00000001 00000000")));
        Assert.Equal(NbdProtocolError.BadMagic, ex.Error);
    }

    [Theory]
    [InlineData(NbdReplyType.Ack, 0u)]
    [InlineData(NbdReplyType.Server, 8196u)]
    [InlineData(NbdReplyType.Info, 65536u)]
    [InlineData(NbdReplyType.ErrUnsup, 4096u)]
    [InlineData((NbdReplyType)0x8000_1234, 4096u)]
    public void MaxPayloadLength_PerType(NbdReplyType type, uint max) => Assert.Equal(max, NbdWire.MaxPayloadLength(type));

    [Theory]
    [InlineData("00000004 6469736b", "disk", null)]
    [InlineData("00000000", "", null)]
    [InlineData("00000004 6469736b 6120646973 6b", "disk", "a disk")]
    public void ParseServerReply_NameAndDescription(string hex, string name, string? description) =>
        Assert.Equal(new NbdExportListing(name, description), NbdWire.ParseServerReply(Hex(hex)));

    /// <summary>One name that is not a spec string no longer fails the whole listing: it is listed, marked.</summary>
    [Theory]
    [InlineData("00000002 ff fe", "\ufffd\ufffd", null)]
    [InlineData("00000002 61 00", "a\0", null)]
    [InlineData("00000003 61 c3 28 6f6b ff", "a\ufffd(", "ok\ufffd")]
    public void ParseServerReply_NameNotASpecString_ListedMarkedInvalid(string hex, string name, string? description)
    {
        NbdExportListing listing = NbdWire.ParseServerReply(Hex(hex));
        Assert.Equal((name, description, false), (listing.Name, listing.Description, listing.NameIsValid));
    }

    [Fact]
    public void ParseServerReply_ValidName_MarkedValid() => Assert.True(NbdWire.ParseServerReply(Hex("00000004 6469736b")).NameIsValid);

    [Theory]
    [InlineData("000000", NbdProtocolError.InvalidValue)]
    [InlineData("00000005 6469736b", NbdProtocolError.OversizedLength)]
    [InlineData("ffffffff 6469736b", NbdProtocolError.OversizedLength)]
    public void ParseServerReply_Invalid_Throws(string hex, NbdProtocolError error) =>
        Assert.Equal(error, Assert.Throws<NbdProtocolException>(() => NbdWire.ParseServerReply(Hex(hex))).Error);

    [Fact]
    public void ParseInfo_AllKnownTypes_Accumulate()
    {
        var info = new NbdWire.InfoBuilder();
        NbdWire.ParseInfo(Hex("0000 0000000000100000 0103"), info);
        NbdWire.ParseInfo(Hex("0003 00000200 00001000 02000000"), info);
        NbdWire.ParseInfo(Hex("0001 63616e6f6e"), info);
        NbdWire.ParseInfo(Hex("0002 6869"), info);
        NbdWire.ParseInfo(Hex("0009 0102030405"), info); // unknown: ignored

        var export = info.Build("asked", NbdOption.Go);
        Assert.Equal(new NbdExportInfo("canon", 0x100000, TransmissionFlags.HasFlags | TransmissionFlags.ReadOnly | TransmissionFlags.CanMultiConn,
            new BlockSizeConstraints(512, 4096, 0x2000000), "hi"), export);
    }

    [Fact]
    public void InfoBuilder_WithoutExport_Throws() =>
        Assert.Equal(NbdProtocolError.UnexpectedReply,
            Assert.Throws<NbdProtocolException>(() => new NbdWire.InfoBuilder().Build("x", NbdOption.Go)).Error);

    [Theory]
    [InlineData("00", NbdProtocolError.InvalidValue)]
    [InlineData("0000 0000000000100000 01", NbdProtocolError.InvalidValue)]
    [InlineData("0000 0000000000100000 0001 00", NbdProtocolError.InvalidValue)]
    [InlineData("0003 00000200 00001000", NbdProtocolError.InvalidValue)]
    [InlineData("0001 ff", NbdProtocolError.InvalidValue)]
    [InlineData("0002 6100", NbdProtocolError.InvalidValue)]
    public void ParseInfo_BadLengthOrString_Throws(string hex, NbdProtocolError error) =>
        Assert.Equal(error, Assert.Throws<NbdProtocolException>(() => NbdWire.ParseInfo(Hex(hex), new NbdWire.InfoBuilder())).Error);

    [Fact]
    public void ParseInfo_NameOver4096_Throws()
    {
        var payload = new byte[2 + 4097];
        payload[1] = 1;
        payload.AsSpan(2).Fill((byte)'a');
        Assert.Equal(NbdProtocolError.OversizedLength,
            Assert.Throws<NbdProtocolException>(() => NbdWire.ParseInfo(payload, new NbdWire.InfoBuilder())).Error);
    }

    [Theory]
    [InlineData(1u, 512u, 512u)]
    [InlineData(512u, 4096u, 0xffffffffu)]
    [InlineData(65536u, 65536u, 65536u)]
    [InlineData(4096u, 4096u, 33554433u)] // maximum need not be a power of 2
    public void ValidateBlockSizes_Valid(uint min, uint preferred, uint max) =>
        Assert.Equal(new BlockSizeConstraints(min, preferred, max), NbdWire.ValidateBlockSizes(min, preferred, max));

    [Theory]
    [InlineData(0u, 512u, 512u)]
    [InlineData(3u, 512u, 512u)]
    [InlineData(131072u, 131072u, 131072u)]
    [InlineData(1u, 256u, 512u)]       // preferred below 512
    [InlineData(1024u, 512u, 4096u)]   // preferred below minimum
    [InlineData(512u, 3000u, 4096u)]   // preferred not a power of 2
    [InlineData(512u, 4096u, 2048u)]   // maximum below preferred
    public void ValidateBlockSizes_Invalid_Throws(uint min, uint preferred, uint max) =>
        Assert.Equal(NbdProtocolError.InvalidValue,
            Assert.Throws<NbdProtocolException>(() => NbdWire.ValidateBlockSizes(min, preferred, max)).Error);

    [Fact]
    public void ParseExportNameReply_SizeAndFlags()
    {
        var (size, flags) = NbdWire.ParseExportNameReply(Hex("0000000100000000 0021"));
        Assert.Equal(1UL << 32, size);
        Assert.Equal(TransmissionFlags.HasFlags | TransmissionFlags.SendTrim, flags);
    }

    [Theory]
    [InlineData("", null)]
    [InlineData("6e6f7065", "nope")]
    [InlineData("61006200", "ab")]
    [InlineData("ff61", "\uFFFDa")]
    public void DecodeTextForPeople_Lenient(string hex, string? expected) =>
        Assert.Equal(expected, NbdWire.DecodeTextForPeople(Hex(hex)));
}

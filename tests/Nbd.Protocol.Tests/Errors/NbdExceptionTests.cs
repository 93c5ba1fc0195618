using System.Net.Sockets;

namespace Nbd.Protocol.Tests.Errors;

public sealed class NbdExceptionTests
{
    [Theory]
    [InlineData(NbdReplyType.ErrUnsup, "NBD_REP_ERR_UNSUP")]
    [InlineData(NbdReplyType.ErrPolicy, "NBD_REP_ERR_POLICY")]
    [InlineData(NbdReplyType.ErrInvalid, "NBD_REP_ERR_INVALID")]
    [InlineData(NbdReplyType.ErrPlatform, "NBD_REP_ERR_PLATFORM")]
    [InlineData(NbdReplyType.ErrTlsReqd, "NBD_REP_ERR_TLS_REQD")]
    [InlineData(NbdReplyType.ErrUnknown, "NBD_REP_ERR_UNKNOWN")]
    [InlineData(NbdReplyType.ErrShutdown, "NBD_REP_ERR_SHUTDOWN")]
    [InlineData(NbdReplyType.ErrBlockSizeReqd, "NBD_REP_ERR_BLOCK_SIZE_REQD")]
    [InlineData(NbdReplyType.ErrTooBig, "NBD_REP_ERR_TOO_BIG")]
    [InlineData(NbdReplyType.ErrExtHeaderReqd, "NBD_REP_ERR_EXT_HEADER_REQD")]
    [InlineData((NbdReplyType)0x8000_00ff, "reply 0x800000ff")]
    public void ServerError_Message_NamesOptionAndCode(NbdReplyType code, string name)
    {
        var ex = new NbdServerErrorException(NbdOption.Go, code, "why");

        Assert.Equal($"Server answered NBD_OPT_GO with {name}: why", ex.Message);
    }

    [Fact]
    public void ReplyTypeValues_MatchSpec()
    {
        // proto.md "Option reply types": errors are 2^31 + n.
        Assert.Equal(1u, (uint)NbdReplyType.Ack);
        Assert.Equal(2u, (uint)NbdReplyType.Server);
        Assert.Equal(3u, (uint)NbdReplyType.Info);
        Assert.Equal((1u << 31) + 1, (uint)NbdReplyType.ErrUnsup);
        Assert.Equal((1u << 31) + 10, (uint)NbdReplyType.ErrExtHeaderReqd);
        Assert.Equal(7u, (uint)NbdOption.Go);
        Assert.Equal(6u, (uint)NbdOption.Info);
        Assert.Equal(4096, (int)TransmissionFlags.BlockStatusPayload);
    }

    [Fact]
    public void TlsRequired_IsServerErrorWithCode()
    {
        NbdServerErrorException ex = new NbdTlsRequiredException(NbdOption.List, null);

        Assert.Equal(NbdReplyType.ErrTlsReqd, ex.ReplyType);
        Assert.Equal("Server answered NBD_OPT_LIST with NBD_REP_ERR_TLS_REQD.", ex.Message);
    }

    [Fact]
    public void Context_AppendedToMessage()
    {
        var ex = new NbdProtocolException(NbdProtocolError.BadMagic, "Bad.") { Server = "h:1", ExportName = "e" };

        Assert.Equal("Bad. (server h:1, export 'e')", ex.Message);
    }

    [Fact]
    public void ConnectException_CarriesEndpointAndSocketError()
    {
        var ex = new NbdConnectException("h:1", new SocketException((int)SocketError.ConnectionRefused));

        Assert.Equal("h:1", ex.EndPoint);
        Assert.Equal(SocketError.ConnectionRefused, ex.SocketError);
        Assert.StartsWith("Cannot connect to h:1: ConnectionRefused", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Timeout_MessageNamesPhaseAndDuration()
    {
        Assert.Equal("Handshake timed out after 300 ms.", new NbdTimeoutException(NbdTimeoutPhase.Handshake, TimeSpan.FromMilliseconds(300)).Message);
        Assert.Equal("Connecting timed out after 10000 ms.", new NbdTimeoutException(NbdTimeoutPhase.Connect, TimeSpan.FromSeconds(10)).Message);
    }

    [Fact]
    public void AllFailures_AreNbdExceptions()
    {
        foreach (var type in new[] { typeof(NbdProtocolException), typeof(NbdServerErrorException), typeof(NbdTlsRequiredException),
                     typeof(NbdTlsNotSupportedException), typeof(NbdTimeoutException), typeof(NbdConnectException) })
        {
            Assert.True(type.IsSubclassOf(typeof(NbdException)), type.Name);
        }

        Assert.True(typeof(NbdUriException).IsSubclassOf(typeof(FormatException)));
    }
}

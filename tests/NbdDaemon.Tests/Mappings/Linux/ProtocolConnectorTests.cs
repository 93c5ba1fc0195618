using Nbd.Protocol;
using NbdDaemon.Mappings;
using NbdDaemon.Mappings.Linux;

namespace NbdDaemon.Tests.Mappings.Linux;

public sealed class ProtocolConnectorTests
{
    [Fact]
    public void Reason_TlsRequired_NamesBothMeaningsAndSuggestsNoUriThisVersionRefuses()
    {
        var e = new NbdTlsRequiredException(NbdOption.Go, null);

        string reason = ProtocolConnector.Reason(e);

        Assert.Contains("requires TLS", reason, StringComparison.Ordinal);
        Assert.Contains("no such export", reason, StringComparison.Ordinal);
        Assert.DoesNotContain("nbds://", reason, StringComparison.Ordinal);
        Assert.Equal(FailureKind.Permanent, ProtocolConnector.KindOf(e));
    }

    [Theory]
    [InlineData(NbdReplyType.ErrUnknown, "nbd-server: no such export", "server refused: NBD_REP_ERR_UNKNOWN, no such export (nbd-server: no such export)")]
    [InlineData(NbdReplyType.ErrPolicy, null, "server refused: NBD_REP_ERR_POLICY, forbidden by the server's policy")]
    [InlineData(NbdReplyType.ErrInvalid, null, "server refused: NBD_REP_ERR_INVALID")]
    [InlineData((NbdReplyType)0x8000_0077, null, "server refused: reply 0x80000077")]
    public void Reason_ServerRefusal_NamesTheReplyAsProtoMdDoes(NbdReplyType reply, string? message, string expected) =>
        Assert.Equal(expected, ProtocolConnector.Reason(new NbdServerErrorException(NbdOption.Go, reply, message)));

    [Fact]
    public void Reason_OldstyleServerAskedForANamedExport_SaysWhatTheServerCannotDo()
    {
        var e = new NbdProtocolException(NbdProtocolError.Unsupported, "Server speaks the oldstyle handshake, which cannot select an export");

        Assert.StartsWith("Server speaks the oldstyle handshake", ProtocolConnector.Reason(e), StringComparison.Ordinal);
    }
}

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

    [Fact]
    public void Reason_OldstyleServerAskedForANamedExport_SaysWhatTheServerCannotDo()
    {
        var e = new NbdProtocolException(NbdProtocolError.Unsupported, "Server speaks the oldstyle handshake, which cannot select an export");

        Assert.StartsWith("Server speaks the oldstyle handshake", ProtocolConnector.Reason(e), StringComparison.Ordinal);
    }
}

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

        Assert.StartsWith("server speaks the oldstyle handshake", ProtocolConnector.Reason(e), StringComparison.Ordinal);
    }

    /// <summary>
    /// A server's own text went raw into the journal, STATUS= and the verbs' stderr: a newline in it forged a log line
    /// of its own, an escape sequence drove the admin's terminal.
    /// </summary>
    [Fact]
    public void Reason_ServerTextWithControlCharacters_Escaped()
    {
        var e = new NbdServerErrorException(NbdOption.Go, NbdReplyType.ErrPolicy, "evil\u001b[31mRED\n16:35:00.000 [INF] fake\a\\");

        Assert.Equal(
            "server refused: NBD_REP_ERR_POLICY, forbidden by the server's policy (evil\\u001b[31mRED\\u000a16:35:00.000 [INF] fake\\u0007\\u005c)",
            ProtocolConnector.Reason(e));
        Assert.Equal("Server answered NBD_OPT_GO with NBD_REP_ERR_POLICY: evil\\u001b[31mRED\\u000a16:35:00.000 [INF] fake\\u0007\\u005c", e.Message);
        Assert.Equal("evil\u001b[31mRED\n16:35:00.000 [INF] fake\a\\", e.ServerMessage); // kept as sent for a program
    }

    /// <summary>
    /// A unix socket's failure keeps its words (where to look): with stack traces at Debug, the exception's message no
    /// longer reaches the journal, so "no such socket file" alone would be all an admin saw.
    /// </summary>
    [Fact]
    public void Reason_UnixSocketFailure_SaysWhereToLook()
    {
        var e = new NbdConnectException("unix:/run/x.sock", new System.Net.Sockets.SocketException((int)System.Net.Sockets.SocketError.AddressNotAvailable),
            "no such socket file (ENOENT): is the server running, and is /run/x.sock where it listens?");

        Assert.Equal("no such socket file (ENOENT): is the server running, and is /run/x.sock where it listens?", ProtocolConnector.Reason(e));
    }

    [Fact]
    public void Reason_Tls_ListingNamesNoExport_StartTlsAcceptedSaysWhatCanBeUsed()
    {
        Assert.Equal("server requires TLS, which this version does not support", ProtocolConnector.Reason(new NbdTlsRequiredException(NbdOption.List, null)));
        Assert.Equal(
            "the server accepted NBD_OPT_STARTTLS, but this client does not implement TLS sessions yet; only a server that also allows plaintext can be used, with an nbd:// URI",
            ProtocolConnector.Reason(new NbdTlsNotSupportedException(
                "The server accepted NBD_OPT_STARTTLS, but this client does not implement TLS sessions yet; only a server that also allows plaintext can be used, with an nbd:// URI.", serverAcceptedStartTls: true)));
    }

    /// <summary>STATUS= said "protocol error: InvalidValue"; which field and which value were only in the stack trace.</summary>
    [Theory]
    [InlineData(NbdProtocolError.InvalidValue, "Preferred block size 3000 is not a power of 2 at least max(minimum 1, 512).", "protocol error: preferred block size 3000 is not a power of 2 at least max(minimum 1, 512)")]
    [InlineData(NbdProtocolError.BadMagic, "NBD_OPT reply magic 0x0 is not 0x3e889045565a9.", "protocol error: NBD_OPT reply magic 0x0 is not 0x3e889045565a9")]
    [InlineData(NbdProtocolError.Truncated, "Server closed the connection while the client was reading the greeting.", "server closed the connection while the client was reading the greeting")]
    public void Reason_ProtocolViolation_SaysWhatWasWrong(NbdProtocolError error, string message, string expected) =>
        Assert.Equal(expected, ProtocolConnector.Reason(new NbdProtocolException(error, message)));
}

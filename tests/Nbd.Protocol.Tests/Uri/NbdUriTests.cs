namespace Nbd.Protocol.Tests.Uri;

public sealed class NbdUriTests
{
    private const string MaxHost = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    private const string LongHost = MaxHost + "a";
    private const string MaxSocket = "ssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss";
    private const string LongSocket = MaxSocket + "s";

    [Theory]
    // The examples table of uri.md "NBD URI export name".
    [InlineData("nbd://example.com/disk", "nbd", false, "example.com", 10809, null, "disk")]
    [InlineData("nbd+unix:///disk?socket=sock", "nbd+unix", false, null, 0, "sock", "disk")]
    [InlineData("nbd://example.com/", "nbd", false, "example.com", 10809, null, "")]
    [InlineData("nbd://example.com", "nbd", false, "example.com", 10809, null, "")]
    [InlineData("nbd://example.com//disk", "nbd", false, "example.com", 10809, null, "/disk")]
    [InlineData("nbd://example.com/hello%20world", "nbd", false, "example.com", 10809, null, "hello world")]
    // Ports, IPv6, TLS schemes, abstract sockets, UTF-8.
    [InlineData("nbd://localhost:10810/e", "nbd", false, "localhost", 10810, null, "e")]
    [InlineData("nbd://127.0.0.1:1/", "nbd", false, "127.0.0.1", 1, null, "")]
    [InlineData("nbd://[::1]/x", "nbd", false, "::1", 10809, null, "x")]
    [InlineData("nbd://[::1]:65535/x", "nbd", false, "::1", 65535, null, "x")]
    [InlineData("nbd://[fe80::1%25eth0]:99/x", "nbd", false, "fe80::1%eth0", 99, null, "x")]
    [InlineData("nbds://host/secure", "nbds", true, "host", 10809, null, "secure")]
    [InlineData("NBD://Host/x", "nbd", false, "Host", 10809, null, "x")]
    [InlineData("nbds+unix:///e?socket=/run/nbd.sock", "nbds+unix", true, null, 0, "/run/nbd.sock", "e")]
    [InlineData("nbd+unix:///?socket=%00/abstract", "nbd+unix", false, null, 0, "\0/abstract", "")]
    [InlineData("nbd+unix://?socket=/s", "nbd+unix", false, null, 0, "/s", "")]
    [InlineData("nbd://h/caf%C3%A9", "nbd", false, "h", 10809, null, "café")]
    [InlineData("nbd://h/e?tls-type=x509&tls-verify-peer=0&tls-hostname=a&x-mine=1", "nbd", false, "h", 10809, null, "e")]
    // RFC 3986 3.2.3: an empty port is the default one.
    [InlineData("nbd://host:/x", "nbd", false, "host", 10809, null, "x")]
    // The limits: a DNS name of 253 characters, a socket path of 107 bytes (sun_path with its NUL).
    [InlineData("nbd://" + MaxHost + "/x", "nbd", false, MaxHost, 10809, null, "x")]
    [InlineData("nbd+unix:///x?socket=/" + MaxSocket, "nbd+unix", false, null, 0, "/" + MaxSocket, "x")]
    public void Parse_Valid_HasComponents(string text, string scheme, bool tls, string? host, int port, string? socket, string export)
    {
        var uri = NbdUri.Parse(text);

        Assert.Equal(scheme, uri.Scheme);
        Assert.Equal(tls, uri.Tls);
        Assert.Equal(host, uri.Host);
        Assert.Equal(port, uri.Port);
        Assert.Equal(socket, uri.SocketPath);
        Assert.Equal(export, uri.ExportName);
        Assert.Equal(socket is not null, uri.IsUnix);
    }

    [Theory]
    [InlineData("", "expected '<scheme>://'")]
    [InlineData("nbd:disk", "expected '<scheme>://'")]
    [InlineData("http://host/x", "unsupported scheme 'http'")]
    [InlineData("nbd+vsock://1/x", "unsupported scheme 'nbd+vsock'")]
    [InlineData("nbd:///x", "needs a host")]
    [InlineData("nbd://:10809/x", "needs a host")]
    [InlineData("nbd://host:0/x", "port '0' is not a number from 1 to 65535")]
    [InlineData("nbd://host:65536/x", "port '65536'")]
    [InlineData("nbd://host:abc/x", "port 'abc'")]
    [InlineData("nbd://" + LongHost + "/x", "longer than 253 characters")]
    [InlineData("nbd+unix:///x?socket=/" + LongSocket, "longer than 107 bytes")]
    [InlineData("nbd://host:-1/x", "port '-1'")]
    [InlineData("nbd://[::1/x", "missing its closing ']'")]
    [InlineData("nbd://[1.2.3.4]/x", "not a valid IPv6 literal")]
    [InlineData("nbd://[::1]x/x", "after the IPv6 literal")]
    [InlineData("nbd+unix:///x", "needs ?socket=PATH")]
    [InlineData("nbd+unix:///x?socket=", "needs ?socket=PATH")]
    [InlineData("nbds+unix:///x", "needs ?socket=PATH")]
    [InlineData("nbd+unix://host/x?socket=/s", "must not name a host or port")]
    [InlineData("nbd+unix://:10809/x?socket=/s", "must not name a host or port")]
    [InlineData("nbd://host/x?socket=/s", "'socket' is only valid with nbd+unix")]
    [InlineData("nbd://host/x?foo=1", "unknown query parameter 'foo'")]
    [InlineData("nbd://host/x?tls-type=bogus", "tls-type 'bogus'")]
    [InlineData("nbd://host/x?tls-verify-peer=yes", "tls-verify-peer 'yes'")]
    [InlineData("nbd+unix:///x?socket=/a&socket=/b", "given twice")]
    [InlineData("nbd://host/x%2", "bad percent-encoding")]
    [InlineData("nbd://host/x%zz", "bad percent-encoding")]
    [InlineData("nbd://host/%FF", "not UTF-8")]
    [InlineData("nbd://host/a%00b", "must not contain NUL")]
    [InlineData("nbd://host/a b", "space or control character")]
    [InlineData("nbd://host/é", "must be percent-encoded")]
    [InlineData("nbd://host/x#frag", "fragment")]
    public void Parse_Invalid_ThrowsWithReason(string text, string reason)
    {
        var ex = Assert.Throws<NbdUriException>(() => NbdUri.Parse(text));

        Assert.Contains(reason, ex.Reason, StringComparison.Ordinal);
        Assert.Contains(reason, ex.Message, StringComparison.Ordinal);
        Assert.IsAssignableFrom<FormatException>(ex);
        Assert.False(NbdUri.TryParse(text, out var uri, out string? error));
        Assert.Null(uri);
        Assert.Equal(ex.Reason, error);
    }

    [Fact]
    public void Parse_ExportNameOver4096Bytes_Throws()
    {
        var ex = Assert.Throws<NbdUriException>(() => NbdUri.Parse("nbd://h/" + new string('a', 4097)));
        Assert.Contains("longer than 4096 bytes", ex.Reason, StringComparison.Ordinal);
        Assert.Equal(4096, NbdUri.Parse("nbd://h/" + new string('a', 4096)).ExportName.Length);
    }

    [Theory]
    [InlineData("nbd://example.com/disk", "nbd://example.com/disk")]
    [InlineData("nbd://example.com", "nbd://example.com/")]
    [InlineData("nbd://example.com:10809/a", "nbd://example.com/a")]
    [InlineData("nbd://[::1]:7/hello%20world", "nbd://[::1]:7/hello%20world")]
    [InlineData("nbds+unix:///e?socket=/run/nbd.sock", "nbds+unix:///e?socket=/run/nbd.sock")]
    [InlineData("nbd+unix:///?socket=%00/abstract", "nbd+unix:///?socket=%00/abstract")]
    [InlineData("nbd://h//a%3Fb%23c", "nbd://h//a%3Fb%23c")]
    [InlineData("nbd://h/caf%c3%a9", "nbd://h/caf%C3%A9")]
    public void ToString_RoundTrips(string text, string canonical)
    {
        var uri = NbdUri.Parse(text);

        Assert.Equal(canonical, uri.ToString());
        Assert.Equal(uri, NbdUri.Parse(uri.ToString()));
    }

    [Fact]
    public void TryParse_Valid_ReturnsUriAndNoError()
    {
        Assert.True(NbdUri.TryParse("nbd://h/e", out var uri, out string? error));
        Assert.Equal("e", uri!.ExportName);
        Assert.Null(error);
    }
}

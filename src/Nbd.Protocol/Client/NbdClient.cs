using System.Net;
using System.Net.Sockets;

namespace Nbd.Protocol;

/// <summary>
/// Entry points: connect a socket (the only place sockets appear), then run the handshake over a stream.
/// </summary>
/// <remarks>
/// TLS: <c>nbds</c>/<c>nbds+unix</c> URIs connect and send NBD_OPT_STARTTLS first (so the message can say whether
/// the server offers TLS), then fail with <see cref="NbdTlsNotSupportedException"/>: TLS sessions are not
/// implemented yet. Plain <c>nbd</c> URIs never send STARTTLS; a server answering NBD_REP_ERR_TLS_REQD produces
/// <see cref="NbdTlsRequiredException"/>.
/// </remarks>
public static class NbdClient
{
    /// <summary>Connects and completes the handshake (GO, falling back to EXPORT_NAME; oldstyle accepted).</summary>
    public static async Task<NbdConnection> ConnectAsync(NbdUri uri, NbdClientOptions? options = null, CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(uri);
        options ??= NbdClientOptions.Default;
        return await OnOwnThread(async () =>
        {
            var socket = await ConnectSocketAsync(uri, options, ct);
            try
            {
                using var stream = new BlockingSocketStream(socket);
                var export = await NegotiateAsync(stream, uri, options, ct);
                return new NbdConnection(export, socket);
            }
            catch
            {
                socket.Dispose();
                throw;
            }
        });
    }

    /// <summary>NBD_OPT_LIST, then a soft disconnect (NBD_OPT_ABORT).</summary>
    public static async Task<IReadOnlyList<NbdExportListing>> ListExportsAsync(NbdUri uri, NbdClientOptions? options = null, CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(uri);
        options ??= NbdClientOptions.Default;
        return await OnOwnThread(async () =>
        {
            using var socket = await ConnectSocketAsync(uri, options, ct);
            using var stream = new BlockingSocketStream(socket);
            return await NegotiateListAsync(stream, uri, options, ct);
        });
    }

    /// <summary>NBD_OPT_INFO on the URI's export, then a soft disconnect (NBD_OPT_ABORT).</summary>
    public static async Task<NbdExportInfo> GetInfoAsync(NbdUri uri, NbdClientOptions? options = null, CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(uri);
        options ??= NbdClientOptions.Default;
        return await OnOwnThread(async () =>
        {
            using var socket = await ConnectSocketAsync(uri, options, ct);
            using var stream = new BlockingSocketStream(socket);
            return await NegotiateInfoAsync(stream, uri, options, ct);
        });
    }

    /// <summary>
    /// Socket I/O here is blocking (see <see cref="BlockingSocketStream"/>), so a connect and handshake run on a thread of
    /// their own rather than holding a thread-pool thread for up to the connect and handshake timeouts.
    /// </summary>
    private static Task<T> OnOwnThread<T>(Func<Task<T>> work) =>
        Task.Factory.StartNew(() => work().GetAwaiter().GetResult(), CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);

    // ---- Handshake over a stream (what the tests drive) -----------------------------------------------------------

    internal static Task<NbdExportInfo> NegotiateAsync(Stream stream, NbdUri uri, NbdClientOptions options, CancellationToken ct) =>
        RunHandshakeAsync(stream, uri, options, abortAfter: false, (h, token) => h.GoAsync(uri.ExportName, token), ct);

    internal static Task<IReadOnlyList<NbdExportListing>> NegotiateListAsync(Stream stream, NbdUri uri, NbdClientOptions options, CancellationToken ct) =>
        RunHandshakeAsync(stream, uri, options, abortAfter: true, (h, token) => h.ListAsync(token), ct);

    internal static Task<NbdExportInfo> NegotiateInfoAsync(Stream stream, NbdUri uri, NbdClientOptions options, CancellationToken ct) =>
        RunHandshakeAsync(stream, uri, options, abortAfter: true, (h, token) => h.InfoAsync(uri.ExportName, token), ct);

    private static async Task<T> RunHandshakeAsync<T>(
        Stream stream, NbdUri uri, NbdClientOptions options, bool abortAfter,
        Func<NbdHandshake, CancellationToken, Task<T>> body, CancellationToken ct)
    {
        using var timeout = new CancellationTokenSource(options.HandshakeTimeout, options.TimeProvider);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(timeout.Token, ct);
        var token = linked.Token;
        var handshake = new NbdHandshake(stream, options.MaxListEntries);
        try
        {
            await handshake.GreetAsync(token);
            if (uri.Tls)
            {
                await RefuseTlsAsync(handshake, token);
            }

            T result;
            try
            {
                result = await body(handshake, token);
            }
            catch (NbdServerErrorException)
            {
                // The server said no politely; leave the same way (and NBD_REP_ERR_SHUTDOWN requires it).
                await handshake.AbortAsync(waitForReply: false, token);
                throw;
            }

            if (abortAfter)
            {
                await handshake.AbortAsync(waitForReply: true, token);
            }

            return result;
        }
        catch (OperationCanceledException ex) when (timeout.IsCancellationRequested && !ct.IsCancellationRequested)
        {
            throw AddContext(new NbdTimeoutException(NbdTimeoutPhase.Handshake, options.HandshakeTimeout, ex, handshake.Awaiting) { NoGreeting = handshake.BytesReceived == 0 }, uri);
        }
        catch (OperationCanceledException ex) when (ct.IsCancellationRequested && ex is not NbdHandshakeCanceledException)
        {
            // The caller's own deadline (a daemon's per-attempt Timeout) ran out first: it gets to say what was awaited.
            throw new NbdHandshakeCanceledException(handshake.Awaiting, handshake.BytesReceived == 0, ex, ct);
        }
        catch (NbdException ex)
        {
            throw AddContext(ex, uri);
        }
    }

    private static async Task RefuseTlsAsync(NbdHandshake handshake, CancellationToken ct)
    {
        if (handshake.Style != NegotiationStyle.FixedNewstyle)
        {
            throw new NbdTlsNotSupportedException(
                "The URI requires TLS but the server does not use fixed newstyle negotiation, so TLS cannot be negotiated.", serverAcceptedStartTls: false);
        }

        try
        {
            await handshake.StartTlsAsync(ct);
        }
        catch (NbdServerErrorException ex)
        {
            await handshake.AbortAsync(waitForReply: false, ct);
            throw new NbdTlsNotSupportedException(
                $"The URI requires TLS and the server refused NBD_OPT_STARTTLS ({NbdServerErrorException.ReplyName(ex.ReplyType)}).", serverAcceptedStartTls: false, ex);
        }

        // After an ACK the spec allows nothing but a TLS handshake; without one the only way out is to hang up.
        throw new NbdTlsNotSupportedException(
            "The server accepted NBD_OPT_STARTTLS, but this client does not implement TLS sessions yet; only a server that also allows plaintext can be used, with an nbd:// URI.",
            serverAcceptedStartTls: true);
    }

    private static NbdException AddContext(NbdException ex, NbdUri uri)
    {
        ex.Server ??= uri.EndPointDescription;
        ex.ExportName ??= uri.ExportName;
        return ex;
    }

    // ---- Connector ------------------------------------------------------------------------------------------------

    private static async Task<Socket> ConnectSocketAsync(NbdUri uri, NbdClientOptions options, CancellationToken ct)
    {
        using var timeout = new CancellationTokenSource(options.ConnectTimeout, options.TimeProvider);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(timeout.Token, ct);
        string endPoint = uri.EndPointDescription;
        try
        {
            if (uri.IsUnix)
            {
                var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    Connect(socket, new UnixDomainSocketEndPoint(uri.SocketPath!), options.ConnectTimeout, linked.Token);
                    return socket;
                }
                catch
                {
                    socket.Dispose();
                    throw;
                }
            }

            IPAddress[] addresses = IPAddress.TryParse(uri.Host, out var literal)
                ? [literal]
                : await Dns.GetHostAddressesAsync(uri.Host!, linked.Token);
            return ConnectFirst([.. addresses.Select(a => new IPEndPoint(a, uri.Port))], options.ConnectTimeout, options.TimeProvider, linked.Token);
        }
        catch (OperationCanceledException ex) when (timeout.IsCancellationRequested && !ct.IsCancellationRequested)
        {
            throw AddContext(new NbdTimeoutException(NbdTimeoutPhase.Connect, options.ConnectTimeout, ex), uri);
        }
        catch (TimeoutException ex)
        {
            throw AddContext(new NbdTimeoutException(NbdTimeoutPhase.Connect, options.ConnectTimeout, ex), uri);
        }
        catch (SocketException ex)
        {
            throw AddContext(new NbdConnectException(endPoint, ex, uri.IsUnix ? UnixSocketFailure(uri.SocketPath!, ex.SocketErrorCode) : null), uri);
        }
    }

    /// <summary>
    /// What a failed connect(2) to a unix socket means, in words: .NET names ENOENT "AddressNotAvailable" ("Cannot assign
    /// requested address"), which sends an admin looking at addresses instead of at a server that is not running.
    /// </summary>
    internal static string? UnixSocketFailure(string path, SocketError error) => error switch
    {
        SocketError.AddressNotAvailable => $"no such socket file (ENOENT): is the server running, and is {path} where it listens?",
        // connect(2) says ECONNREFUSED for a path that is no socket at all, too.
        SocketError.ConnectionRefused when Directory.Exists(path) => $"{path} is a directory, not a socket (ECONNREFUSED)",
        SocketError.ConnectionRefused => $"nothing listens on {path} (ECONNREFUSED): a server that ended may have left its socket file behind, or the file is no socket",
        SocketError.AccessDenied => "permission denied (EACCES) on the socket file or a directory above it",
        _ => null,
    };

    /// <summary>
    /// Connects to the first of <paramref name="endPoints"/> that answers, in order. Each gets its share of what is left
    /// of <paramref name="budget"/> (the last gets all of it), so an address that never answers (a blackholed IPv6 route
    /// listed first) cannot use up the time of the ones after it; one that refuses passes on at once.
    /// </summary>
    internal static Socket ConnectFirst(IReadOnlyList<IPEndPoint> endPoints, TimeSpan budget, TimeProvider time, CancellationToken ct)
    {
        long started = time.GetTimestamp();
        for (int i = 0; i < endPoints.Count; i++)
        {
            TimeSpan left = budget - time.GetElapsedTime(started);
            TimeSpan share = left / (endPoints.Count - i);
            var socket = new Socket(endPoints[i].AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                // .NET makes an IPv6 socket IPV6_V6ONLY, and such a socket cannot reach an IPv4-mapped address
                // ([::ffff:192.0.2.1], ENETUNREACH); an IPv6 socket that may use IPv4 reaches it as other clients do.
                if (endPoints[i].Address.IsIPv4MappedToIPv6)
                {
                    socket.DualMode = true;
                }

                Connect(socket, endPoints[i], share, ct);
                socket.NoDelay = true;
                return socket;
            }
            catch (Exception ex) when (ex is SocketException or TimeoutException && !ct.IsCancellationRequested && i < endPoints.Count - 1)
            {
                socket.Dispose(); // the next address; the last one's failure is what the caller gets
            }
            catch
            {
                socket.Dispose();
                throw;
            }
        }

        throw new SocketException((int)SocketError.HostNotFound); // no address at all
    }

    /// <summary>
    /// A blocking connect(2), bounded by SO_SNDTIMEO (Linux applies it to connect) and by <paramref name="ct"/>, which
    /// closes the socket to wake it. Blocking, not ConnectAsync: see <see cref="BlockingSocketStream"/> for why this
    /// socket must never join the runtime's epoll loop.
    /// </summary>
    private static void Connect(Socket socket, EndPoint endPoint, TimeSpan timeout, CancellationToken ct)
    {
        ct.ThrowIfCancellationRequested();
        socket.SendTimeout = (int)Math.Clamp(Math.Ceiling(timeout.TotalMilliseconds), 1, int.MaxValue);
        using (ct.Register(static s => ((Socket)s!).Dispose(), socket))
        {
            try
            {
                socket.Connect(endPoint);
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException && ct.IsCancellationRequested)
            {
                throw new OperationCanceledException(ct);
            }
            catch (SocketException e) when (e.SocketErrorCode is SocketError.InProgress or SocketError.WouldBlock or SocketError.TimedOut)
            {
                throw new TimeoutException($"connect to {endPoint} took longer than {timeout.TotalMilliseconds} ms", e);
            }
        }

        // The kernel's own sends on this socket must not time out.
        socket.SendTimeout = 0;
    }
}

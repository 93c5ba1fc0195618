using System.Net;
using System.Net.Sockets;

namespace Nbd.Protocol.Tests.TestSupport;

/// <summary>What one server connection does wrong, counted by the 1-based index of the request on that connection.</summary>
internal enum ServerFault
{
    None,

    /// <summary>Request <see cref="ConnectionScript.FaultAt"/> is received, not carried out, and the connection closes.</summary>
    CloseWithoutReply,

    /// <summary>The reply to request FaultAt stops halfway (inside a read's data, else inside the header), then close.</summary>
    CutInsideReply,

    /// <summary>The reply to request FaultAt has a magic that is no reply magic.</summary>
    BadMagic,

    /// <summary>The reply to request FaultAt is a structured reply chunk header, never negotiated.</summary>
    StructuredMagic,

    /// <summary>The reply to request FaultAt carries a cookie no request has.</summary>
    UnknownCookie,

    /// <summary>
    /// Shutting down as nbdkit does on SIGTERM: request FaultAt and every later one are answered NBD_ESHUTDOWN, not
    /// carried out; the connection closes on the client's NBD_CMD_DISC (recorded) or when the client closes it.
    /// </summary>
    ShuttingDown,
}

/// <param name="AnswerFirst">Requests after this index get no reply (they stay in flight until the connection ends).</param>
/// <param name="FaultAt">The 1-based request index at which <paramref name="Fault"/> happens.</param>
/// <param name="Fault">What goes wrong there; after it the connection is gone.</param>
/// <param name="ReplyDelay">Waited before each reply.</param>
/// <param name="ReorderBatch">Replies are held until this many are ready, then sent last first.</param>
/// <param name="HangUpAtOnce">The connection is closed as soon as it is accepted (an idle drop).</param>
/// <param name="KeepOpenAfterDisc">NBD_CMD_DISC is recorded and ignored: the connection stays open (a server that hangs).</param>
/// <param name="DropWhenSuperseded">A request is carried out only while no later connection was accepted; else this connection closes without it (as a server process that died would: a client's late write on an old connection never lands after a newer one).</param>
/// <param name="ReorderWhenIdle">With <paramref name="ReorderBatch"/>: the replies held go out (last first) also whenever no further request is waiting, so a client that stops sending gets them all.</param>
internal sealed record ConnectionScript(
    int AnswerFirst = int.MaxValue,
    int FaultAt = 0,
    ServerFault Fault = ServerFault.None,
    TimeSpan ReplyDelay = default,
    int ReorderBatch = 0,
    bool HangUpAtOnce = false,
    bool KeepOpenAfterDisc = false,
    bool ReorderWhenIdle = false,
    bool DropWhenSuperseded = false)
{
    public static readonly ConnectionScript Normal = new();
}

/// <summary>One request as the server received it: the raw header bytes, its fields and its write data.</summary>
internal sealed record ReceivedRequest(byte[] Header, RawRequest Fields, byte[]? Data);

/// <summary>One accepted connection: what arrived on it, in wire order, and when it ended.</summary>
internal sealed class ServerConnection(int index)
{
    private readonly List<ReceivedRequest> _requests = [];
    private readonly TaskCompletionSource _ended = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public int Index { get; } = index;

    /// <summary>Completes when the server side saw the end of the connection (or closed it itself).</summary>
    public Task Ended => _ended.Task;

    public IReadOnlyList<ReceivedRequest> Requests
    {
        get
        {
            lock (_requests)
            {
                return [.. _requests];
            }
        }
    }

    public IReadOnlyList<ulong> Cookies => [.. Requests.Select(r => r.Fields.Cookie)];

    internal void Add(ReceivedRequest request)
    {
        lock (_requests)
        {
            _requests.Add(request);
        }
    }

    internal void End() => _ended.TrySetResult();
}

/// <summary>
/// An NBD server in transmission phase over a shared in-memory disk, on a real listening socket (a unix socket in a
/// temp directory, or TCP loopback). Handles READ/WRITE/FLUSH/TRIM/DISC with simple replies; each accepted connection
/// follows the <see cref="ConnectionScript"/> chosen for its index. Requests past the disk's end get EINVAL.
/// </summary>
internal sealed class InMemoryNbdServer : IAsyncDisposable
{
    public const uint Einval = 22;
    public const uint Eshutdown = 108;

    private readonly Socket _listener;
    private readonly EndPoint _endPoint;
    private readonly string? _directory;
    private readonly Func<int, ConnectionScript> _scripts;
    private readonly byte[] _disk;
    private readonly List<ServerConnection> _connections = [];
    private readonly List<Task> _serving = [];
    private readonly List<Socket> _sockets = [];
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _accepting;

    public InMemoryNbdServer(int diskSize, Func<int, ConnectionScript>? scripts = null, bool tcp = false)
    {
        _disk = new byte[diskSize];
        _scripts = scripts ?? (_ => ConnectionScript.Normal);
        if (tcp)
        {
            _listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            _listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            _endPoint = _listener.LocalEndPoint!;
        }
        else
        {
            _directory = Directory.CreateTempSubdirectory("nbd-relay-").FullName;
            _endPoint = new UnixDomainSocketEndPoint(Path.Combine(_directory, "server.sock"));
            _listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            _listener.Bind(_endPoint);
        }

        _listener.Listen(16);
        _accepting = Task.Run(AcceptLoopAsync);
    }

    /// <summary>The listening socket's path (a unix socket server; null for TCP).</summary>
    public string? UnixPath => (_endPoint as UnixDomainSocketEndPoint)?.ToString();

    /// <summary>A snapshot of the disk.</summary>
    public byte[] Disk
    {
        get
        {
            lock (_disk)
            {
                return (byte[])_disk.Clone();
            }
        }
    }

    public IReadOnlyList<ServerConnection> Connections
    {
        get
        {
            lock (_connections)
            {
                return [.. _connections];
            }
        }
    }

    public void Fill(int seed)
    {
        lock (_disk)
        {
            new Random(seed).NextBytes(_disk);
        }
    }

    /// <summary>
    /// A connected socket on which no asynchronous operation ever ran (the relay makes blocking calls on it), like
    /// NbdClient hands over after the handshake.
    /// </summary>
    public Socket Connect()
    {
        var socket = new Socket(_endPoint.AddressFamily, SocketType.Stream, _endPoint.AddressFamily == AddressFamily.Unix ? ProtocolType.Unspecified : ProtocolType.Tcp);
        try
        {
            socket.Connect(_endPoint);
            return socket;
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    public async Task<ServerConnection> ConnectionAsync(int index, CancellationToken ct)
    {
        await Wait.UntilAsync(() => Connections.Count > index, $"server connection #{index}", ct);
        return Connections[index];
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        _listener.Dispose();
        lock (_sockets)
        {
            foreach (Socket socket in _sockets)
            {
                socket.Dispose();
            }
        }

        Task[] serving;
        lock (_serving)
        {
            serving = [_accepting, .. _serving];
        }

        await Task.WhenAll(serving).WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        _stop.Dispose();
        if (_directory is not null)
        {
            Directory.Delete(_directory, recursive: true);
        }
    }

    private async Task AcceptLoopAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket socket;
            try
            {
                socket = await _listener.AcceptAsync(_stop.Token);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                return;
            }

            ServerConnection connection;
            lock (_connections)
            {
                connection = new ServerConnection(_connections.Count);
                _connections.Add(connection);
            }

            lock (_sockets)
            {
                _sockets.Add(socket);
            }

            ConnectionScript script = _scripts(connection.Index);
            lock (_serving)
            {
                _serving.Add(Task.Run(() => ServeAsync(socket, connection, script)));
            }
        }
    }

    private async Task ServeAsync(Socket socket, ServerConnection connection, ConnectionScript script)
    {
        CancellationToken ct = _stop.Token;
        var held = new List<byte[]>();
        try
        {
            for (int index = 1; !script.HangUpAtOnce; index++)
            {
                byte[]? header = await RawTransmission.TryReceiveExactlyAsync(socket, RawTransmission.RequestLength, ct);
                if (header is null)
                {
                    return;
                }

                RawRequest request = RawTransmission.ParseRequest(header);
                byte[]? data = request.Type == RawTransmission.CmdWrite
                    ? await RawTransmission.ReceiveExactlyAsync(socket, (int)request.Length, ct)
                    : null;
                connection.Add(new ReceivedRequest(header, request, data));
                if (request.Type == RawTransmission.CmdDisc)
                {
                    if (script.KeepOpenAfterDisc)
                    {
                        continue;
                    }

                    return;
                }

                bool fault = index == script.FaultAt && script.Fault != ServerFault.None;
                if (fault && script.Fault == ServerFault.CloseWithoutReply)
                {
                    return;
                }

                if (script.Fault == ServerFault.ShuttingDown && script.FaultAt > 0 && index >= script.FaultAt)
                {
                    await RawTransmission.SendAsync(socket, RawTransmission.SimpleReply(Eshutdown, request.Cookie), ct);
                    continue;
                }

                if (Execute(request, data, script.DropWhenSuperseded ? connection.Index : null) is not { } executed)
                {
                    return;
                }

                (uint error, byte[]? payload) = executed;

                if (fault)
                {
                    await SendFaultyReplyAsync(socket, script.Fault, request, error, payload, ct);
                    if (script.Fault == ServerFault.CutInsideReply)
                    {
                        return;
                    }

                    // A client that understood the reply as garbage hangs up; wait for that.
                    await DrainAsync(socket, ct);
                    return;
                }

                if (index > script.AnswerFirst)
                {
                    continue;
                }

                byte[] reply = [.. RawTransmission.SimpleReply(error, request.Cookie), .. payload ?? []];
                if (script.ReorderBatch > 0)
                {
                    held.Add(reply);
                    if (held.Count == script.ReorderBatch || (script.ReorderWhenIdle && socket.Available == 0))
                    {
                        for (int i = held.Count - 1; i >= 0; i--)
                        {
                            await RawTransmission.SendAsync(socket, held[i], ct);
                        }

                        held.Clear();
                    }

                    continue;
                }

                if (script.ReplyDelay > TimeSpan.Zero)
                {
                    await Task.Delay(script.ReplyDelay, ct);
                }

                await RawTransmission.SendAsync(socket, reply, ct);
            }
        }
        catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException or Xunit.Sdk.XunitException)
        {
            // The peer went away (the relay dropped this connection) or the server is being disposed.
        }
        finally
        {
            socket.Dispose();
            connection.End();
        }
    }

    /// <summary>Null when <paramref name="unlessSupersededFrom"/> is set and a later connection exists (checked with the disk locked).</summary>
    private (uint Error, byte[]? Payload)? Execute(RawRequest request, byte[]? data, int? unlessSupersededFrom = null)
    {
        if (request.Type is RawTransmission.CmdFlush)
        {
            return (0, null);
        }

        if (request.Offset + request.Length > (ulong)_disk.Length)
        {
            return (Einval, null);
        }

        lock (_disk)
        {
            if (unlessSupersededFrom is int index && Connections.Count > index + 1)
            {
                return null;
            }

            switch (request.Type)
            {
                case RawTransmission.CmdRead:
                    return (0, _disk.AsSpan((int)request.Offset, (int)request.Length).ToArray());
                case RawTransmission.CmdWrite:
                    data.CopyTo(_disk.AsSpan((int)request.Offset));
                    return (0, null);
                case RawTransmission.CmdTrim:
                    _disk.AsSpan((int)request.Offset, (int)request.Length).Clear();
                    return (0, null);
                default:
                    return (Einval, null);
            }
        }
    }

    private static async Task SendFaultyReplyAsync(Socket socket, ServerFault fault, RawRequest request, uint error, byte[]? payload, CancellationToken ct)
    {
        byte[] reply = fault switch
        {
            ServerFault.BadMagic => RawTransmission.SimpleReply(error, request.Cookie, magic: 0x67446699),
            ServerFault.StructuredMagic => RawTransmission.SimpleReply(error, request.Cookie, magic: RawTransmission.StructuredReplyMagic),
            ServerFault.UnknownCookie => RawTransmission.SimpleReply(error, ~request.Cookie),
            _ => [.. RawTransmission.SimpleReply(error, request.Cookie), .. payload ?? []],
        };

        int length = fault == ServerFault.CutInsideReply
            ? payload is { Length: > 1 } ? RawTransmission.SimpleReplyLength + (payload.Length / 2) : RawTransmission.SimpleReplyLength / 2
            : reply.Length;
        await RawTransmission.SendAsync(socket, reply.AsMemory(0, length), ct);
    }

    private static async Task DrainAsync(Socket socket, CancellationToken ct)
    {
        var sink = new byte[64 * 1024];
        while (await socket.ReceiveAsync(sink, SocketFlags.None, ct) > 0)
        {
        }
    }
}

internal static class Wait
{
    /// <summary>Polls <paramref name="condition"/> until it holds; the token bounds it (a test deadline).</summary>
    public static async Task UntilAsync(Func<bool> condition, string what, CancellationToken ct)
    {
        while (!condition())
        {
            if (ct.IsCancellationRequested)
            {
                Assert.Fail("Timed out waiting for " + what + ".");
            }

            await Task.Delay(5, CancellationToken.None);
        }
    }
}

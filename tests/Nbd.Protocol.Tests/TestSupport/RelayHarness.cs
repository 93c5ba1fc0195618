using System.Collections.Concurrent;
using System.Net.Sockets;
using Nbd.Protocol.Transmission;

namespace Nbd.Protocol.Tests.TestSupport;

/// <summary>
/// An <see cref="NbdRelay"/> between a socket the test plays the kernel on (a connected AF_UNIX pair, as socketpair(2)
/// gives the daemon) and an <see cref="InMemoryNbdServer"/>. Reconnects go to the same server unless the test scripts them.
/// </summary>
internal sealed class RelayHarness : IAsyncDisposable
{
    private readonly ConcurrentQueue<NbdRelayEvent> _events = new();
    private int _reconnectCalls;

    private RelayHarness(InMemoryNbdServer server, Socket kernel, NbdRelay relay)
    {
        Server = server;
        Kernel = kernel;
        Relay = relay;
    }

    public InMemoryNbdServer Server { get; }

    /// <summary>The test's end of the pair: what the driver would hold.</summary>
    public Socket Kernel { get; }

    public NbdRelay Relay { get; }

    public IReadOnlyList<NbdRelayEvent> Events => [.. _events];

    /// <summary>How often the relay called its Reconnect delegate.</summary>
    public int ReconnectCalls => Volatile.Read(ref _reconnectCalls);

    /// <summary>
    /// Starts a relay on a first connection to <paramref name="server"/>. <paramref name="reconnect"/> replaces the plain
    /// reconnect (connect to the same server) and gets the 1-based call number; <paramref name="eventsThrow"/> makes the
    /// event callback throw after recording; the other arguments are the relay's options.
    /// </summary>
    public static RelayHarness Start(
        InMemoryNbdServer server,
        Func<int, CancellationToken, Task<Socket>>? reconnect = null,
        TimeSpan? giveUpAfter = null,
        TimeSpan? retryInterval = null,
        Func<Exception, bool>? isPermanent = null,
        TimeProvider? timeProvider = null,
        bool eventsThrow = false,
        int requestBufferBytes = 1 << 20)
    {
        (Socket relayEnd, Socket kernelEnd) = UnixPair();
        RelayHarness? harness = null;
        var options = new NbdRelayOptions
        {
            Reconnect = ct =>
            {
                int call = Interlocked.Increment(ref harness!._reconnectCalls);
                return reconnect is null ? Task.FromResult(server.Connect()) : reconnect(call, ct);
            },
            GiveUpAfter = giveUpAfter ?? TimeSpan.FromSeconds(10),
            RetryInterval = retryInterval ?? TimeSpan.FromMilliseconds(20),
            IsPermanent = isPermanent,
            Events = e =>
            {
                harness!._events.Enqueue(e);
                if (eventsThrow)
                {
                    throw new InvalidOperationException("a faulty event callback");
                }
            },
            Name = "relay-test",
            TimeProvider = timeProvider ?? TimeProvider.System,
            RequestBufferBytes = requestBufferBytes,
        };

        var relay = new NbdRelay(relayEnd, server.Connect(), options);
        harness = new RelayHarness(server, kernelEnd, relay);
        relay.Start();
        return harness;
    }

    public Task SendAsync(byte[] bytes, CancellationToken ct) => RawTransmission.SendAsync(Kernel, bytes, ct);

    public Task SendRequestAsync(ushort type, ulong cookie, ulong offset, uint length, CancellationToken ct, byte[]? data = null, ushort flags = 0) =>
        SendAsync([.. RawTransmission.Request(type, cookie, offset, length, flags), .. data ?? []], ct);

    /// <summary>
    /// One reply as the kernel reads it: the header, then the data a successful read carries (its length is the
    /// request's, which only the kernel knows: <paramref name="readLength"/> gives it per cookie, 0 for non-reads).
    /// </summary>
    public async Task<(RawReply Reply, byte[] Data)> ReceiveReplyAsync(Func<ulong, int> readLength, CancellationToken ct)
    {
        RawReply reply = RawTransmission.ParseReply(await RawTransmission.ReceiveExactlyAsync(Kernel, RawTransmission.SimpleReplyLength, ct));
        Assert.Equal(RawTransmission.SimpleReplyMagic.ToString("x8", null), reply.Magic.ToString("x8", null));
        int length = reply.Error == 0 ? readLength(reply.Cookie) : 0;
        byte[] data = length > 0 ? await RawTransmission.ReceiveExactlyAsync(Kernel, length, ct) : [];
        return (reply, data);
    }

    /// <summary>Asserts that nothing more comes from the relay: the kernel end reads end of stream.</summary>
    public async Task ExpectKernelEndOfStreamAsync(CancellationToken ct) =>
        Assert.True(await RawTransmission.IsEndOfStreamAsync(Kernel, ct), "The relay sent bytes to the kernel where the kernel end should have been shut down.");

    public async Task<NbdRelayEnd> CompletionAsync(CancellationToken ct) => await Relay.Completion.WaitAsync(ct);

    public async Task WaitForEventsAsync(Func<IReadOnlyList<NbdRelayEvent>, bool> condition, string what, CancellationToken ct) =>
        await Wait.UntilAsync(() => condition(Events), what, ct);

    public ValueTask DisposeAsync()
    {
        Relay.Dispose();
        Kernel.Dispose();
        return ValueTask.CompletedTask;
    }

    /// <summary>A connected AF_UNIX stream pair through a listener in a private temp directory.</summary>
    public static (Socket First, Socket Second) UnixPair()
    {
        string directory = Directory.CreateTempSubdirectory("nbd-pair-").FullName;
        try
        {
            var endPoint = new UnixDomainSocketEndPoint(Path.Combine(directory, "pair.sock"));
            using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            listener.Bind(endPoint);
            listener.Listen(1);
            var second = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            second.Connect(endPoint);
            return (listener.Accept(), second);
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }
}

using System.Collections.Concurrent;
using System.Net.Sockets;
using Nbd.Protocol.Tests.TestSupport;
using Nbd.Protocol.Transmission;
using static Nbd.Protocol.Tests.Transmission.RelayTest;
using static Nbd.Protocol.Tests.TestSupport.RawTransmission;

namespace Nbd.Protocol.Tests.Transmission;

/// <summary>Two writers of pipelined random I/O through one relay while the server connection keeps failing.</summary>
public sealed class NbdRelayStressTests
{
    private const int BlockSize = 4096;
    private const int Blocks = 1024;
    private const int RequestsPerProducer = 250;
    private const int QueueDepth = 16;

    private static readonly ServerFault[] Faults =
        [ServerFault.CloseWithoutReply, ServerFault.CutInsideReply, ServerFault.BadMagic, ServerFault.UnknownCookie, ServerFault.StructuredMagic];

    [Fact(Timeout = 120_000)]
    public async Task Relay_TwoProducersPipelinedRandomIoWhileServerFailsEvery50Requests_EveryReadMatchesReference()
    {
        using var deadline = Deadline(100);

        // Connection i fails in the i-th way after 35..65 requests (every fourth one also slow to reply); late connections
        // stay healthy so the run ends.
        await using var server = new InMemoryNbdServer(
            Blocks * BlockSize,
            i => i >= 30 ? ConnectionScript.Normal : new ConnectionScript(FaultAt: 35 + new Random(i).Next(31), Fault: Faults[i % Faults.Length], ReplyDelay: i % 4 == 3 ? TimeSpan.FromMilliseconds(1) : TimeSpan.Zero),
            tcp: true);
        server.Fill(seed: 200);
        byte[] reference = server.Disk;
        await using var harness = RelayHarness.Start(server);

        var waiting = new ConcurrentDictionary<ulong, (int ReadLength, TaskCompletionSource<(RawReply, byte[])> Reply)>();
        using var sendLock = new SemaphoreSlim(1);
        long nextCookie = 0x5000;

        Task dispatcher = Task.Run(
            async () =>
            {
                for (int received = 0; received < 2 * RequestsPerProducer; received++)
                {
                    var (reply, data) = await harness.ReceiveReplyAsync(c => waiting.TryGetValue(c, out var w) ? w.ReadLength : throw new Xunit.Sdk.XunitException($"Reply for cookie 0x{c:x}, which is not in flight."), deadline.Token);
                    Assert.True(waiting.TryRemove(reply.Cookie, out var entry), $"Second reply for cookie 0x{reply.Cookie:x}.");
                    entry.Reply.SetResult((reply, data));
                }
            },
            deadline.Token);

        async Task ProducerAsync(int producer)
        {
            var random = new Random(300 + producer);
            int firstBlock = producer * (Blocks / 2);
            var busy = new HashSet<int>();
            var inFlight = new List<Task>();
            using var depth = new SemaphoreSlim(QueueDepth);
            for (int n = 0; n < RequestsPerProducer; n++)
            {
                await depth.WaitAsync(deadline.Token);
                int block, count;
                while (true)
                {
                    count = 1 + random.Next(8);
                    block = firstBlock + random.Next((Blocks / 2) - count);
                    lock (busy)
                    {
                        // No two requests of one producer overlap while in flight, so the reference decides every read.
                        if (!Enumerable.Range(block, count).Any(busy.Contains))
                        {
                            busy.UnionWith(Enumerable.Range(block, count));
                            break;
                        }
                    }

                    await Task.Delay(1, deadline.Token);
                }

                ulong cookie = (ulong)Interlocked.Increment(ref nextCookie) - 1;
                int offset = block * BlockSize, length = count * BlockSize;
                bool write = random.Next(2) == 0;
                byte[] expected;
                byte[] message;
                if (write)
                {
                    byte[] data = Bytes(length, random.Next());
                    lock (reference)
                    {
                        data.CopyTo(reference, offset);
                    }

                    expected = [];
                    message = [.. Request(CmdWrite, cookie, (ulong)offset, (uint)length), .. data];
                }
                else
                {
                    lock (reference)
                    {
                        expected = reference.AsSpan(offset, length).ToArray();
                    }

                    message = Request(CmdRead, cookie, (ulong)offset, (uint)length);
                }

                var reply = new TaskCompletionSource<(RawReply, byte[])>(TaskCreationOptions.RunContinuationsAsynchronously);
                Assert.True(waiting.TryAdd(cookie, (write ? 0 : length, reply)));
                await sendLock.WaitAsync(deadline.Token);
                try
                {
                    await harness.SendAsync(message, deadline.Token);
                }
                finally
                {
                    sendLock.Release();
                }

                inFlight.Add(Task.Run(
                    async () =>
                    {
                        var (header, data) = await reply.Task.WaitAsync(deadline.Token);
                        Assert.Equal(0u, header.Error);
                        Assert.True(expected.AsSpan().SequenceEqual(data), $"Read 0x{cookie:x} ({length} bytes at {offset}) differs from the reference.");
                        lock (busy)
                        {
                            busy.ExceptWith(Enumerable.Range(block, count));
                        }

                        depth.Release();
                    },
                    deadline.Token));
            }

            await Task.WhenAll(inFlight);
        }

        await Task.WhenAll(ProducerAsync(0), ProducerAsync(1));
        await dispatcher;

        Assert.True(reference.AsSpan().SequenceEqual(server.Disk), "The server's disk differs from the reference after the run.");
        Assert.Equal(0, harness.Relay.InFlight);
        Assert.False(harness.Relay.Completion.IsCompleted);
        int lost = harness.Events.Count(e => e is NbdRelayServerLost);
        Assert.True(harness.Relay.Reconnects >= 6, $"Only {harness.Relay.Reconnects} reconnects in {2 * RequestsPerProducer} requests.");
        Assert.Equal(server.Connections.Count - 1, harness.Relay.Reconnects);
        Assert.Equal(lost, harness.Relay.Reconnects);
        Assert.Equal(lost, harness.Events.Count(e => e is NbdRelayReconnected));
    }

    [Fact(Timeout = 120_000)]
    public async Task Dispose_DuringPipelinedTrafficAndReconnects_ReturnsPromptlyEveryTime()
    {
        // Dispose lands anywhere: inside a request, a reply, a resend, a reconnect. An exception escaping a relay
        // thread would take the test host down; a thread that never ends would show as a slow Dispose.
        using var deadline = Deadline(100);
        var random = new Random(400);
        for (int round = 0; round < 20; round++)
        {
            await using var server = new InMemoryNbdServer(
                DiskSize,
                i => new ConnectionScript(FaultAt: 5 + ((round + i) % 15), Fault: Faults[(round + i) % Faults.Length]));
            await using var harness = RelayHarness.Start(server, retryInterval: TimeSpan.FromMilliseconds(1));
            var stream = new List<byte>();
            for (int n = 0; n < 200; n++)
            {
                ulong offset = (ulong)random.Next(DiskSize / 4096) * 4096;
                stream.AddRange(n % 2 == 0 ? [.. Request(CmdWrite, (ulong)n, offset, 4096), .. Bytes(4096, n)] : Request(CmdRead, (ulong)n, offset, 4096));
            }

            Task sending = Task.Run(async () =>
            {
                try
                {
                    await harness.SendAsync([.. stream], deadline.Token);
                }
                catch (Exception e) when (e is SocketException or ObjectDisposedException)
                {
                    // The relay went away underneath: that is the point.
                }
            });
            Task draining = Task.Run(async () =>
            {
                var sink = new byte[65536];
                try
                {
                    while (await harness.Kernel.ReceiveAsync(sink, SocketFlags.None, deadline.Token) > 0)
                    {
                    }
                }
                catch (Exception e) when (e is SocketException or ObjectDisposedException)
                {
                }
            });
            await Task.Delay(random.Next(30), deadline.Token);

            TimeSpan took = TimeSpan.Zero;
            var disposer = new Thread(() =>
            {
                var clock = System.Diagnostics.Stopwatch.StartNew();
                harness.Relay.Dispose();
                took = clock.Elapsed;
            });
            disposer.Start();
            await Wait.UntilAsync(() => !disposer.IsAlive, $"Dispose in round {round}", deadline.Token);
            Assert.True(took < TimeSpan.FromSeconds(5), $"Round {round}: Dispose took {took.TotalMilliseconds:0} ms.");
            Assert.True(harness.Relay.Completion.IsCompleted, $"Round {round}: Completion still open after Dispose.");
            harness.Kernel.Dispose();
            await Task.WhenAll(sending, draining).WaitAsync(deadline.Token);
        }
    }
}

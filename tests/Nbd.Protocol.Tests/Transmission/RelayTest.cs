using Nbd.Protocol.Tests.TestSupport;
using Nbd.Protocol.Transmission;

namespace Nbd.Protocol.Tests.Transmission;

/// <summary>What the relay tests share: a deadline per test, seeded data, collecting replies by cookie.</summary>
internal static class RelayTest
{
    public const int DiskSize = 1 << 20;

    /// <summary>Every socket wait in a relay test is bounded by this, so a hung relay fails the test instead of the run.</summary>
    public static CancellationTokenSource Deadline(int seconds = 20) => new(TimeSpan.FromSeconds(seconds));

    public static byte[] Bytes(int length, int seed)
    {
        var data = new byte[length];
        new Random(seed).NextBytes(data);
        return data;
    }

    /// <summary>
    /// Reads <paramref name="count"/> replies and asserts that each cookie comes back exactly once and that a read's
    /// data is the expected bytes.
    /// </summary>
    public static async Task<List<(RawReply Reply, byte[] Data)>> ReceiveRepliesAsync(
        RelayHarness harness, int count, IReadOnlyDictionary<ulong, byte[]> expectedReads, ISet<ulong> expectedCookies, CancellationToken ct)
    {
        var replies = new List<(RawReply, byte[])>();
        var seen = new HashSet<ulong>();
        for (int i = 0; i < count; i++)
        {
            var (reply, data) = await harness.ReceiveReplyAsync(c => expectedReads.TryGetValue(c, out byte[]? d) ? d.Length : 0, ct);
            Assert.True(expectedCookies.Contains(reply.Cookie), $"Reply for cookie 0x{reply.Cookie:x16}, which the kernel never sent.");
            Assert.True(seen.Add(reply.Cookie), $"Second reply for cookie 0x{reply.Cookie:x16}.");
            Assert.Equal(0u, reply.Error);
            if (expectedReads.TryGetValue(reply.Cookie, out byte[]? expected))
            {
                Assert.True(expected.AsSpan().SequenceEqual(data), $"Read 0x{reply.Cookie:x16} returned other bytes than the disk holds.");
            }

            replies.Add((reply, data));
        }

        return replies;
    }

    /// <summary>The relay's events are exactly one lost connection and one takeover that resent <paramref name="resent"/>.</summary>
    public static void AssertOneReconnect(RelayHarness harness, int inFlight, int resent)
    {
        IReadOnlyList<NbdRelayEvent> events = harness.Events;
        Assert.Collection(
            events,
            e => Assert.Equal(inFlight, Assert.IsType<NbdRelayServerLost>(e).InFlight),
            e =>
            {
                var reconnected = Assert.IsType<NbdRelayReconnected>(e);
                Assert.Equal(resent, reconnected.Resent);
                Assert.Equal(1, reconnected.Attempts);
            });
        Assert.Equal(1, harness.Relay.Reconnects);
        Assert.Equal(2, harness.Server.Connections.Count);
    }
}

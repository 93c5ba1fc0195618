using System.Net.Sockets;

namespace Nbd.Protocol.Transmission;

/// <summary>How an <see cref="NbdRelay"/> gets a new server connection and how long it keeps trying.</summary>
public sealed class NbdRelayOptions
{
    /// <summary>
    /// Opens a new connection to the same export, handshake done and the export checked by the caller (same size and
    /// writability): the relay resends unanswered requests on it, so it must be the same disk. The relay owns the
    /// returned socket. Exceptions are retried every <see cref="RetryInterval"/> unless <see cref="IsPermanent"/>.
    /// </summary>
    public required Func<CancellationToken, Task<Socket>> Reconnect { get; init; }

    /// <summary>
    /// How long the relay keeps reconnecting before it gives up and shuts the kernel's end down (the driver then sees a
    /// dead connection, as it would have without the relay). Zero: no reconnect at all; <see cref="TimeSpan.MaxValue"/>:
    /// never give up. Negative values (<see cref="Timeout.InfiniteTimeSpan"/> too) are refused. It also bounds how long,
    /// after the kernel's NBD_CMD_DISC, the server may take to send the replies it owes (with zero:
    /// <see cref="NbdRelay.DisconnectWaitWithoutReconnect"/>).
    /// </summary>
    public TimeSpan GiveUpAfter { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>Pause between reconnect attempts (0 to about 49.7 days, a timer's range). The first attempt is immediate.</summary>
    public TimeSpan RetryInterval { get; init; } = TimeSpan.FromMilliseconds(250);

    /// <summary>True for a reconnect failure that no retry can fix (a changed export): the relay gives up at once.</summary>
    public Func<Exception, bool>? IsPermanent { get; init; }

    /// <summary>
    /// Called on the relay's threads for each event; keep it short (logging), and never dispose the relay from it
    /// (Dispose waits for those threads).
    /// </summary>
    public Action<NbdRelayEvent>? Events { get; init; }

    /// <summary>Name of the relay's threads, for debuggers and /proc.</summary>
    public string Name { get; init; } = "nbd-relay";

    public TimeProvider TimeProvider { get; init; } = TimeProvider.System;

    /// <summary>
    /// Bytes of requests the relay holds until they are answered (at first; rounded up to a power of two); it reads no
    /// further request while they are all taken, and grows only for a single request larger than that (to twice its
    /// size). Tests make it small.
    /// </summary>
    internal int RequestBufferBytes { get; init; } = 1 << 20;
}

/// <summary>Something the relay did that a person may want to know.</summary>
public abstract record NbdRelayEvent;

/// <summary>The server connection ended; <paramref name="InFlight"/> requests wait for a new one.</summary>
public sealed record NbdRelayServerLost(string Reason, int InFlight, Exception? Exception) : NbdRelayEvent;

/// <summary>A reconnect attempt failed; the relay tries again unless it gave up.</summary>
public sealed record NbdRelayReconnectFailed(int Attempt, Exception Exception) : NbdRelayEvent;

/// <summary>The relay stopped keeping its journal: after a kill, the requests in flight wait for the driver's timeout.</summary>
internal sealed record NbdRelayJournalAbandoned(string Reason) : NbdRelayEvent;

/// <summary>A new server connection took over after <paramref name="Outage"/>; <paramref name="Resent"/> requests were sent again.</summary>
public sealed record NbdRelayReconnected(TimeSpan Outage, int Attempts, int Resent) : NbdRelayEvent;

/// <summary>Why a relay ended.</summary>
public enum NbdRelayEndReason
{
    /// <summary>The kernel shut its end down (request timeout, NBD_CLEAR_SOCK, device disconnected).</summary>
    KernelClosed,

    /// <summary>The kernel sent NBD_CMD_DISC; it was passed on to the server.</summary>
    Disconnected,

    /// <summary>No new server connection within <see cref="NbdRelayOptions.GiveUpAfter"/>, or a permanent failure.</summary>
    GaveUp,

    /// <summary>The kernel's end sent something that is not a request the relay can carry.</summary>
    KernelProtocolError,

    /// <summary>Disposed by its owner.</summary>
    Stopped,

    /// <summary>An unexpected exception on a relay thread (a bug); the kernel's end was shut down.</summary>
    Failed,

    /// <summary>
    /// <see cref="NbdRelay.TryHandOver"/>: stopped between two requests with every reply delivered; the kernel's
    /// connection was left open for whoever received our end.
    /// </summary>
    HandedOver,
}

/// <summary>How a relay ended, in words for the journal.</summary>
public sealed record NbdRelayEnd(NbdRelayEndReason Reason, string Detail, Exception? Exception = null);

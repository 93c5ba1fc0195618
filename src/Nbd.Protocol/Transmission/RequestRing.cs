using System.Buffers;
using System.Net.Sockets;

namespace Nbd.Protocol.Transmission;

/// <summary>
/// The kernel's request stream, received straight into a ring and kept there, byte for byte, until the request each
/// byte belongs to is answered: stream position p is at p mod <see cref="Capacity"/>. Written by one thread (the
/// relay's kernel thread: <see cref="Head"/> and <see cref="Parsed"/> are its own); which bytes are free is the caller's
/// word (the tail it passes, the start of the oldest request not yet released). A request larger than the ring makes
/// it grow: the bytes not yet taken as requests move to a larger buffer, and the requests taken before stay valid in
/// the buffer they were received into.
/// </summary>
internal sealed class RequestRing : IDisposable
{
    private readonly byte[]? _rented;
    private Memory<byte> _buffer;

    public RequestRing(int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, NbdTransmission.RequestLength);
        _rented = ArrayPool<byte>.Shared.Rent(capacity);
        _buffer = _rented;
    }

    /// <summary>A ring in memory the caller owns (a relay journal's), at least a request header long.</summary>
    public RequestRing(Memory<byte> memory)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(memory.Length, NbdTransmission.RequestLength);
        _buffer = memory;
    }

    public int Capacity => _buffer.Length;

    /// <summary>Bytes received so far: the stream position the next recv(2) writes at.</summary>
    public long Head { get; private set; }

    /// <summary>Where the next request starts: everything before it was taken by <see cref="Take"/>.</summary>
    public long Parsed { get; private set; }

    /// <summary>Bytes received and not yet taken as requests.</summary>
    public int Unparsed => (int)(Head - Parsed);

    /// <summary>
    /// Takes up a ring a predecessor received into (its bytes are still in the memory): <paramref name="head"/> bytes of
    /// the stream received, requests taken up to <paramref name="parsed"/>.
    /// </summary>
    public void Restore(long head, long parsed)
    {
        if (parsed > head || head - parsed > Capacity)
        {
            throw new ArgumentOutOfRangeException(nameof(parsed), "the unparsed bytes must lie within the ring");
        }

        Head = head;
        Parsed = parsed;
    }

    /// <summary>Bytes the ring can still receive, with everything before <paramref name="tail"/> released.</summary>
    public int Room(long tail) => Capacity - (int)(Head - tail);

    /// <summary>
    /// Receives what <paramref name="socket"/> has, at most <paramref name="room"/> bytes (see <see cref="Room"/>) and
    /// never across the end of the buffer; returns what recv(2) returned (0: the peer closed).
    /// </summary>
    public int Receive(Socket socket, int room)
    {
        int at = (int)(Head % Capacity);
        int n = socket.Receive(_buffer.Span.Slice(at, Math.Min(room, Capacity - at)));
        Head += n;
        return n;
    }

    /// <summary>Copies the first bytes not yet taken (a request header) without taking them.</summary>
    public void Peek(Span<byte> destination)
    {
        if (destination.Length > Unparsed)
        {
            throw new InvalidOperationException("fewer bytes received than asked for");
        }

        new RingSlice(_buffer, Parsed, destination.Length).CopyTo(destination);
    }

    /// <summary>Takes the next <paramref name="length"/> bytes as one request; they stay until the caller's tail passes them.</summary>
    public RingSlice Take(int length)
    {
        if (length > Unparsed)
        {
            throw new InvalidOperationException("fewer bytes received than the request has");
        }

        var slice = new RingSlice(_buffer, Parsed, length);
        Parsed += length;
        return slice;
    }

    /// <summary>
    /// Moves to a buffer of at least <paramref name="capacity"/> bytes, carrying the bytes not yet taken. Requests taken
    /// before keep the old buffer, which nothing writes to again.
    /// </summary>
    public void Grow(int capacity)
    {
        if (capacity <= Capacity)
        {
            return;
        }

        Memory<byte> larger = GC.AllocateUninitializedArray<byte>(capacity);
        var unparsed = new RingSlice(_buffer, Parsed, Unparsed);
        new RingSlice(larger, Parsed, Unparsed).CopyFrom(unparsed);
        _buffer = larger;
    }

    /// <summary>Gives the first buffer back to the pool (if it came from there): only once nobody reads a request any more.</summary>
    public void Dispose()
    {
        if (_rented is not null)
        {
            ArrayPool<byte>.Shared.Return(_rented);
        }
    }
}

/// <summary>Stream bytes [Start, Start + Length) in a ring buffer: one span, or two where the ring wraps.</summary>
internal readonly struct RingSlice(Memory<byte> buffer, long start, int length)
{
    public long Start { get; } = start;

    public int Length { get; } = length;

    public long End => Start + Length;

    private int Offset => (int)(Start % buffer.Length);

    private int FirstLength => Math.Min(Length, buffer.Length - Offset);

    /// <summary>The bytes up to the end of the buffer.</summary>
    public ReadOnlySpan<byte> First => buffer.Span.Slice(Offset, FirstLength);

    /// <summary>The bytes from the start of the buffer, where the slice wraps; else empty.</summary>
    public ReadOnlySpan<byte> Second => buffer.Span[..(Length - FirstLength)];

    public void CopyTo(Span<byte> destination)
    {
        First.CopyTo(destination);
        Second.CopyTo(destination[FirstLength..]);
    }

    /// <summary>Fills this slice (of the same length) from <paramref name="source"/>.</summary>
    public void CopyFrom(RingSlice source)
    {
        byte[] bytes = new byte[source.Length];
        source.CopyTo(bytes);
        bytes.AsSpan(0, FirstLength).CopyTo(buffer.Span[Offset..]);
        bytes.AsSpan(FirstLength).CopyTo(buffer.Span);
    }
}

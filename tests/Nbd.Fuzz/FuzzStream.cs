using Microsoft.Extensions.Time.Testing;

namespace Nbd.Fuzz;

/// <summary>
/// The client's end of an in-memory connection: reads return the scripted server bytes in chunks of at most
/// <c>maxChunk</c>, writes are discarded. When the script is used up the server either closes (reads return 0,
/// the client sees EOF) or, with a <paramref name="stallClock"/>, goes silent: the read waits on the client's
/// token and moves the fake clock on by <paramref name="stallAdvance"/>, so the client's own handshake timeout
/// fires at once instead of after ten real seconds. Everything completes synchronously on the caller's thread,
/// which is what lets the engine charge every allocation to the case that made it.
/// </summary>
internal sealed class FuzzStream(byte[] serverBytes, int maxChunk, FakeTimeProvider? stallClock = null, TimeSpan stallAdvance = default) : Stream
{
    private int _position;

    public long BytesWritten { get; private set; }

    public override bool CanRead => true;

    public override bool CanWrite => true;

    public override bool CanSeek => false;

    public override long Length => throw new NotSupportedException();

    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        if (_position == serverBytes.Length && stallClock is not null)
        {
            throw new NotSupportedException("A stalled server needs the async path, which carries the handshake's token.");
        }

        return Take(buffer);
    }

    public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        if (_position < serverBytes.Length || stallClock is null || buffer.IsEmpty)
        {
            return ValueTask.FromResult(Take(buffer.Span));
        }

        // Silence. A read whose token cannot be cancelled would wait forever: that is a hang for the watchdog.
        var silence = new TaskCompletionSource<int>(TaskCreationOptions.RunContinuationsAsynchronously);
        if (cancellationToken.CanBeCanceled)
        {
            cancellationToken.Register(static s => ((TaskCompletionSource<int>)s!).TrySetCanceled(), silence);
            stallClock.Advance(stallAdvance);
        }

        return new ValueTask<int>(silence.Task);
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override void Write(byte[] buffer, int offset, int count) => BytesWritten += count;

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        BytesWritten += buffer.Length;
        return ValueTask.CompletedTask;
    }

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override void Flush()
    {
    }

    public override Task FlushAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    private int Take(Span<byte> buffer)
    {
        int n = Math.Min(Math.Min(buffer.Length, serverBytes.Length - _position), maxChunk);
        serverBytes.AsSpan(_position, n).CopyTo(buffer);
        _position += n;
        return n;
    }
}

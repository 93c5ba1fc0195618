using System.Net.Sockets;

namespace Nbd.Protocol;

/// <summary>
/// The handshake's stream: blocking send/recv on the socket, never .NET's async socket engine.
/// </summary>
/// <remarks>
/// Why: an async operation registers the socket with the runtime's epoll loop, and the registration belongs to the
/// open file description, which the kernel keeps alive after NBD_SET_SOCK. Every packet the nbd driver then moves on
/// "our" socket woke the runtime's socket thread and thread-pool workers that had nothing to do: measured in the VM,
/// ~75 % of a vCPU during sequential reads, and half of nbd-client's throughput. Cancellation (the handshake timeout,
/// a stop) shuts the socket down, which wakes a blocked recv; the read then reports the cancellation, not an EOF.
/// </remarks>
internal sealed class BlockingSocketStream(Socket socket) : Stream
{
    public override bool CanRead => true;

    public override bool CanWrite => true;

    public override bool CanSeek => false;

    public override long Length => throw new NotSupportedException();

    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        using (cancellationToken.Register(Unblock, socket))
        {
            int read;
            try
            {
                read = socket.Receive(buffer.Span);
            }
            catch (SocketException e)
            {
                throw Translate(e, cancellationToken);
            }

            // A shutdown by the cancellation looks like an orderly EOF to recv; report it as what it is.
            cancellationToken.ThrowIfCancellationRequested();
            return ValueTask.FromResult(read);
        }
    }

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        using (cancellationToken.Register(Unblock, socket))
        {
            try
            {
                while (!buffer.IsEmpty)
                {
                    buffer = buffer[socket.Send(buffer.Span)..];
                }
            }
            catch (SocketException e)
            {
                throw Translate(e, cancellationToken);
            }
        }

        return ValueTask.CompletedTask;
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override int Read(byte[] buffer, int offset, int count) => ReadAsync(buffer.AsMemory(offset, count)).AsTask().GetAwaiter().GetResult();

    public override void Write(byte[] buffer, int offset, int count) => WriteAsync(buffer.AsMemory(offset, count)).AsTask().GetAwaiter().GetResult();

    public override Task FlushAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public override void Flush()
    {
    }

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    /// <summary>As <see cref="NetworkStream"/> does: socket errors surface as <see cref="IOException"/>.</summary>
    private static Exception Translate(SocketException e, CancellationToken cancellationToken) =>
        cancellationToken.IsCancellationRequested ? new OperationCanceledException(cancellationToken) : new IOException(e.Message, e);

    private static void Unblock(object? state)
    {
        try
        {
            ((Socket)state!).Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            // Already closed or never connected: nothing is blocked on it.
        }
    }
}

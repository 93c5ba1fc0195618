using System.Net.Sockets;

namespace Nbd.Protocol.Transmission;

/// <summary>
/// Buffered exact reads from a blocking socket on a dedicated thread: one recv(2) usually brings several small
/// messages (a server sends its replies back to back). Large payloads bypass the buffer.
/// </summary>
internal sealed class BlockingSocketReader(Socket socket, int bufferSize = 64 * 1024)
{
    private readonly byte[] _buffer = new byte[bufferSize];
    private int _start;
    private int _end;

    /// <summary>Fills <paramref name="destination"/>; false on an orderly end before its first byte.</summary>
    /// <exception cref="EndOfStreamException">The stream ended inside the message.</exception>
    public bool TryReadExactly(Span<byte> destination)
    {
        if (_start == _end && !Fill())
        {
            return false;
        }

        ReadExactly(destination);
        return true;
    }

    /// <exception cref="EndOfStreamException">The stream ended before <paramref name="destination"/> was filled.</exception>
    public void ReadExactly(Span<byte> destination)
    {
        while (!destination.IsEmpty)
        {
            if (_start < _end)
            {
                int n = Math.Min(_end - _start, destination.Length);
                _buffer.AsSpan(_start, n).CopyTo(destination);
                _start += n;
                destination = destination[n..];
            }
            else if (destination.Length >= _buffer.Length)
            {
                int read = socket.Receive(destination);
                if (read == 0)
                {
                    throw new EndOfStreamException("connection ended inside a message");
                }

                destination = destination[read..];
            }
            else if (!Fill())
            {
                throw new EndOfStreamException("connection ended inside a message");
            }
        }
    }

    private bool Fill()
    {
        _start = 0;
        _end = socket.Receive(_buffer);
        return _end > 0;
    }
}

namespace Nbd.Protocol;

/// <summary>How the server negotiates (proto.md "Handshake").</summary>
internal enum NegotiationStyle
{
    Oldstyle,
    Newstyle,
    FixedNewstyle,
}

/// <summary>
/// The client side of the NBD handshake over any <see cref="Stream"/>. One instance per connection; phases live in
/// partial files (Greeting, Go, List, Tls). Cancellation is the caller's: the handshake timeout is a token.
/// Every read is of an exact, already-bounded length, so a lying server costs at most the bound.
/// </summary>
internal sealed partial class NbdHandshake
{
    private readonly Stream _stream;
    private readonly int _maxListEntries;

    public NbdHandshake(Stream stream, int maxListEntries = 100_000)
    {
        _stream = stream;
        _maxListEntries = maxListEntries;
    }

    public NegotiationStyle Style { get; private set; }

    /// <summary>Server handshake flags (newstyle only).</summary>
    public HandshakeFlags ServerFlags { get; private set; }

    /// <summary>Client flags we sent (newstyle only).</summary>
    public ClientFlags SentFlags { get; private set; }

    /// <summary>What the handshake reads or sends right now, or last did ("the server greeting …"); null before it began.</summary>
    public string? Awaiting { get; private set; }

    /// <summary>Bytes read from the server so far: 0 means it has not sent a byte of its greeting.</summary>
    public long BytesReceived { get; private set; }

    private async ValueTask<byte[]> ReadExactAsync(int count, string what, CancellationToken ct)
    {
        var buffer = new byte[count];
        if (count == 0)
        {
            return buffer;
        }

        Awaiting = what;
        try
        {
            // ReadExactlyAsync would not say how much came before a cancellation; the count tells a server that sent
            // nothing (no NBD server) from one that stopped half-way.
            for (int read = 0; read < count;)
            {
                int n = await _stream.ReadAsync(buffer.AsMemory(read), ct);
                if (n == 0)
                {
                    throw new EndOfStreamException();
                }

                read += n;
                BytesReceived += n;
            }
        }
        catch (EndOfStreamException ex)
        {
            throw new NbdProtocolException(NbdProtocolError.Truncated, $"Server closed the connection while the client was reading {what}.", ex);
        }
        catch (IOException ex)
        {
            throw new NbdProtocolException(NbdProtocolError.Truncated, $"Connection failed while reading {what}: {ex.Message}", ex);
        }

        return buffer;
    }

    private async ValueTask WriteAsync(byte[] message, string what, CancellationToken ct)
    {
        Awaiting = "the server to take " + what;
        try
        {
            await _stream.WriteAsync(message, ct);
            await _stream.FlushAsync(ct);
        }
        catch (IOException ex)
        {
            throw new NbdProtocolException(NbdProtocolError.Truncated, $"Connection failed while sending {what}: {ex.Message}", ex);
        }
    }

    private async ValueTask SendOptionAsync(byte[] message, NbdOption option, CancellationToken ct) =>
        await WriteAsync(message, NbdServerErrorException.OptionName(option), ct);

    /// <summary>
    /// Reads one option reply to <paramref name="option"/>. Checks, in order and before reading the payload:
    /// magic, option echo, that the type is one <paramref name="allowed"/> (or an error), and the length bound.
    /// Error replies are raised as <see cref="NbdServerErrorException"/> (TLS_REQD as its subclass).
    /// </summary>
    private async ValueTask<(NbdReplyType Type, byte[] Payload)> ReadReplyAsync(NbdOption option, NbdReplyType[] allowed, CancellationToken ct)
    {
        string optionName = NbdServerErrorException.OptionName(option);
        byte[] headerBytes = await ReadExactAsync(NbdWire.OptionReplyHeaderLength, $"the reply header to {optionName}", ct);
        var header = NbdWire.ParseOptionReplyHeader(headerBytes);
        if (header.Option != option)
        {
            throw new NbdProtocolException(NbdProtocolError.UnexpectedReply, $"Server replied to option {(uint)header.Option} but the client sent {optionName}.");
        }

        bool isError = NbdWire.IsError(header.Type);
        if (!isError && Array.IndexOf(allowed, header.Type) < 0)
        {
            throw new NbdProtocolException(NbdProtocolError.UnexpectedReply, $"Server sent {NbdServerErrorException.ReplyName(header.Type)} to {optionName}, which does not allow it.");
        }

        uint max = NbdWire.MaxPayloadLength(header.Type);
        if (header.Length > max)
        {
            string reply = NbdServerErrorException.ReplyName(header.Type);
            throw new NbdProtocolException(NbdProtocolError.OversizedLength, max == 0
                ? $"Server sent {reply} to {optionName} with {header.Length} bytes of data; it carries none."
                : $"Server announced {header.Length} bytes of {reply} data for {optionName}; at most {max} are accepted.");
        }

        byte[] payload = await ReadExactAsync((int)header.Length, $"the reply data to {optionName}", ct);
        if (isError)
        {
            string? message = NbdWire.DecodeTextForPeople(payload);
            throw header.Type == NbdReplyType.ErrTlsReqd
                ? new NbdTlsRequiredException(option, message)
                : new NbdServerErrorException(option, header.Type, message);
        }

        return (header.Type, payload);
    }

    /// <summary>
    /// Soft disconnect (proto.md "Termination of the session during option haggling"): send NBD_OPT_ABORT and, if
    /// <paramref name="waitForReply"/>, wait for the ACK. The server may also just close, so every failure here is
    /// swallowed: the session is over either way.
    /// </summary>
    public async Task AbortAsync(bool waitForReply, CancellationToken ct)
    {
        if (Style != NegotiationStyle.FixedNewstyle)
        {
            return;
        }

        try
        {
            await SendOptionAsync(NbdWire.BuildOption(NbdOption.Abort, []), NbdOption.Abort, ct);
            if (waitForReply)
            {
                await ReadReplyAsync(NbdOption.Abort, [NbdReplyType.Ack], ct);
            }
        }
        catch (Exception ex) when (ex is NbdException or IOException or OperationCanceledException or ObjectDisposedException or NotSupportedException)
        {
            // Best effort by design; the caller closes the connection next.
        }
    }

    private void RequireFixedNewstyle(NbdOption option)
    {
        if (Style != NegotiationStyle.FixedNewstyle)
        {
            throw new NbdProtocolException(NbdProtocolError.Unsupported,
                $"Server uses {(Style == NegotiationStyle.Oldstyle ? "oldstyle" : "non-fixed newstyle")} negotiation, which cannot do {NbdServerErrorException.OptionName(option)}.");
        }
    }
}

using System.Buffers.Binary;
using System.Net.Sockets;

namespace Nbd.Protocol.Tests.TestSupport;

/// <summary>
/// Hand-built transmission-phase messages with the spec's numbers written out here, independent of the product's
/// constants: to prove that the socket <see cref="NbdClient.ConnectAsync"/> returns is positioned exactly at the start
/// of transmission, and to play the kernel and the server around the relay.
/// </summary>
internal static class RawTransmission
{
    // proto.md "Request message": magic u32, command flags u16, type u16, cookie u64, offset u64, length u32.
    public const uint RequestMagic = 0x25609513;
    public const int RequestLength = 28;

    // proto.md "Simple reply message": magic u32, error u32, cookie u64.
    public const uint SimpleReplyMagic = 0x67446698;
    public const int SimpleReplyLength = 16;

    // proto.md "Structured reply chunk message": a client that never negotiated it must not see this magic.
    public const uint StructuredReplyMagic = 0x668e33ef;

    public const ushort CmdRead = 0;
    public const ushort CmdWrite = 1;
    public const ushort CmdDisc = 2;
    public const ushort CmdFlush = 3;
    public const ushort CmdTrim = 4;

    public static async Task<byte[]> ReadAsync(Socket socket, ulong offset, uint length, ulong cookie, CancellationToken ct)
    {
        await SendAsync(socket, Request(CmdRead, cookie, offset, length), ct);
        await ExpectSimpleReplyAsync(socket, cookie, ct);
        return await ReceiveExactlyAsync(socket, (int)length, ct);
    }

    public static async Task WriteAsync(Socket socket, ulong offset, byte[] data, ulong cookie, CancellationToken ct)
    {
        byte[] message = [.. Request(CmdWrite, cookie, offset, (uint)data.Length), .. data];
        await SendAsync(socket, message, ct);
        await ExpectSimpleReplyAsync(socket, cookie, ct);
    }

    /// <summary>NBD_CMD_DISC has no reply; the server closes its end, which we observe as end of stream.</summary>
    public static async Task DisconnectAsync(Socket socket, CancellationToken ct)
    {
        await SendAsync(socket, Request(CmdDisc, cookie: 0xD15C, offset: 0, length: 0), ct);
        Assert.True(await IsEndOfStreamAsync(socket, ct), "Server sent data after NBD_CMD_DISC instead of closing the connection.");
    }

    public static byte[] Request(ushort type, ulong cookie, ulong offset, uint length, ushort flags = 0, uint magic = RequestMagic)
    {
        var request = new byte[RequestLength];
        BinaryPrimitives.WriteUInt32BigEndian(request.AsSpan(0), magic);
        BinaryPrimitives.WriteUInt16BigEndian(request.AsSpan(4), flags);
        BinaryPrimitives.WriteUInt16BigEndian(request.AsSpan(6), type);
        BinaryPrimitives.WriteUInt64BigEndian(request.AsSpan(8), cookie);
        BinaryPrimitives.WriteUInt64BigEndian(request.AsSpan(16), offset);
        BinaryPrimitives.WriteUInt32BigEndian(request.AsSpan(24), length);
        return request;
    }

    public static RawRequest ParseRequest(ReadOnlySpan<byte> header) => new(
        BinaryPrimitives.ReadUInt32BigEndian(header),
        BinaryPrimitives.ReadUInt16BigEndian(header[4..]),
        BinaryPrimitives.ReadUInt16BigEndian(header[6..]),
        BinaryPrimitives.ReadUInt64BigEndian(header[8..]),
        BinaryPrimitives.ReadUInt64BigEndian(header[16..]),
        BinaryPrimitives.ReadUInt32BigEndian(header[24..]));

    public static byte[] SimpleReply(uint error, ulong cookie, uint magic = SimpleReplyMagic)
    {
        var reply = new byte[SimpleReplyLength];
        BinaryPrimitives.WriteUInt32BigEndian(reply.AsSpan(0), magic);
        BinaryPrimitives.WriteUInt32BigEndian(reply.AsSpan(4), error);
        BinaryPrimitives.WriteUInt64BigEndian(reply.AsSpan(8), cookie);
        return reply;
    }

    public static RawReply ParseReply(ReadOnlySpan<byte> header) => new(
        BinaryPrimitives.ReadUInt32BigEndian(header),
        BinaryPrimitives.ReadUInt32BigEndian(header[4..]),
        BinaryPrimitives.ReadUInt64BigEndian(header[8..]));

    public static async Task SendAsync(Socket socket, ReadOnlyMemory<byte> data, CancellationToken ct)
    {
        while (!data.IsEmpty)
        {
            data = data[await socket.SendAsync(data, SocketFlags.None, ct)..];
        }
    }

    public static async Task<byte[]> ReceiveExactlyAsync(Socket socket, int count, CancellationToken ct)
    {
        var buffer = new byte[count];
        int filled = 0;
        while (filled < count)
        {
            int read = await socket.ReceiveAsync(buffer.AsMemory(filled), SocketFlags.None, ct);
            Assert.True(read > 0, $"The peer closed the connection after {filled} of {count} bytes.");
            filled += read;
        }

        return buffer;
    }

    /// <summary>Null on an orderly end before the first byte; an end inside the message fails the caller.</summary>
    public static async Task<byte[]?> TryReceiveExactlyAsync(Socket socket, int count, CancellationToken ct)
    {
        var buffer = new byte[count];
        int first = await socket.ReceiveAsync(buffer, SocketFlags.None, ct);
        if (first == 0)
        {
            return null;
        }

        if (first < count)
        {
            byte[] rest = await ReceiveExactlyAsync(socket, count - first, ct);
            rest.CopyTo(buffer, first);
        }

        return buffer;
    }

    /// <summary>True when the peer ended the stream (or reset it) without sending another byte.</summary>
    public static async Task<bool> IsEndOfStreamAsync(Socket socket, CancellationToken ct)
    {
        var one = new byte[1];
        try
        {
            return await socket.ReceiveAsync(one, SocketFlags.None, ct) == 0;
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset)
        {
            return true;
        }
    }

    private static async Task ExpectSimpleReplyAsync(Socket socket, ulong cookie, CancellationToken ct)
    {
        RawReply reply = ParseReply(await ReceiveExactlyAsync(socket, SimpleReplyLength, ct));
        Assert.Equal(SimpleReplyMagic.ToString("x8", null), reply.Magic.ToString("x8", null));
        Assert.Equal(0u, reply.Error);
        Assert.Equal(cookie, reply.Cookie);
    }
}

internal readonly record struct RawRequest(uint Magic, ushort Flags, ushort Type, ulong Cookie, ulong Offset, uint Length);

internal readonly record struct RawReply(uint Magic, uint Error, ulong Cookie);

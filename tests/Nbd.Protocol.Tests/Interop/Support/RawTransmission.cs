using System.Buffers.Binary;
using System.Net.Sockets;

namespace Nbd.Protocol.Tests.Interop.Support;

/// <summary>
/// Hand-built transmission-phase messages, to prove that the socket <see cref="NbdClient.ConnectAsync"/> returns is
/// positioned exactly at the start of transmission (no handshake byte left unread, none consumed too many).
/// </summary>
internal static class RawTransmission
{
    // proto.md "Request message": magic u32, command flags u16, type u16, cookie u64, offset u64, length u32.
    private const uint RequestMagic = 0x25609513;
    private const int RequestLength = 28;

    // proto.md "Simple reply message": magic u32, error u32, cookie u64.
    private const uint SimpleReplyMagic = 0x67446698;
    private const int SimpleReplyLength = 16;

    private const ushort CmdRead = 0;
    private const ushort CmdWrite = 1;
    private const ushort CmdDisc = 2;

    public static async Task<byte[]> ReadAsync(Socket socket, ulong offset, uint length, ulong cookie, CancellationToken ct)
    {
        await SendAsync(socket, Request(CmdRead, cookie, offset, length), ct);
        await ExpectSimpleReplyAsync(socket, cookie, ct);
        return await ReceiveExactlyAsync(socket, (int)length, ct);
    }

    public static async Task WriteAsync(Socket socket, ulong offset, byte[] data, ulong cookie, CancellationToken ct)
    {
        await SendAsync(socket, [.. Request(CmdWrite, cookie, offset, (uint)data.Length), .. data], ct);
        await ExpectSimpleReplyAsync(socket, cookie, ct);
    }

    /// <summary>NBD_CMD_DISC has no reply; the server closes its end, which we observe as end of stream.</summary>
    public static async Task DisconnectAsync(Socket socket, CancellationToken ct)
    {
        await SendAsync(socket, Request(CmdDisc, cookie: 0xD15C, offset: 0, length: 0), ct);
        var rest = new byte[1];
        int read = await socket.ReceiveAsync(rest, SocketFlags.None, ct);
        Assert.True(read == 0, "Server sent data after NBD_CMD_DISC instead of closing the connection.");
    }

    private static byte[] Request(ushort type, ulong cookie, ulong offset, uint length)
    {
        var request = new byte[RequestLength];
        BinaryPrimitives.WriteUInt32BigEndian(request.AsSpan(0), RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(request.AsSpan(4), 0);
        BinaryPrimitives.WriteUInt16BigEndian(request.AsSpan(6), type);
        BinaryPrimitives.WriteUInt64BigEndian(request.AsSpan(8), cookie);
        BinaryPrimitives.WriteUInt64BigEndian(request.AsSpan(16), offset);
        BinaryPrimitives.WriteUInt32BigEndian(request.AsSpan(24), length);
        return request;
    }

    private static async Task ExpectSimpleReplyAsync(Socket socket, ulong cookie, CancellationToken ct)
    {
        byte[] reply = await ReceiveExactlyAsync(socket, SimpleReplyLength, ct);
        Assert.Equal(SimpleReplyMagic.ToString("x8", null), BinaryPrimitives.ReadUInt32BigEndian(reply).ToString("x8", null));
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32BigEndian(reply.AsSpan(4)));
        Assert.Equal(cookie, BinaryPrimitives.ReadUInt64BigEndian(reply.AsSpan(8)));
    }

    private static async Task SendAsync(Socket socket, byte[] data, CancellationToken ct)
    {
        int sent = 0;
        while (sent < data.Length)
        {
            sent += await socket.SendAsync(data.AsMemory(sent), SocketFlags.None, ct);
        }
    }

    private static async Task<byte[]> ReceiveExactlyAsync(Socket socket, int count, CancellationToken ct)
    {
        var buffer = new byte[count];
        int filled = 0;
        while (filled < count)
        {
            int read = await socket.ReceiveAsync(buffer.AsMemory(filled), SocketFlags.None, ct);
            Assert.True(read > 0, $"Server closed the connection after {filled} of {count} bytes.");
            filled += read;
        }

        return buffer;
    }
}

using System.Net.Sockets;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel.Tests;

/// <summary>SO_PEEK_OFF of a unix stream socket: where the next MSG_PEEK reads, lowered by every consuming recv(2).</summary>
internal static class PeekOffsets
{
    public static void Set(Socket socket, int value) =>
        socket.SetRawSocketOption(SocketConstants.SOL_SOCKET, SocketConstants.SO_PEEK_OFF, BitConverter.GetBytes(value));

    /// <summary>-1 while unset.</summary>
    public static int Get(Socket socket)
    {
        var value = new byte[sizeof(int)];
        Assert.Equal(sizeof(int), socket.GetRawSocketOption(SocketConstants.SOL_SOCKET, SocketConstants.SO_PEEK_OFF, value));
        return BitConverter.ToInt32(value);
    }
}

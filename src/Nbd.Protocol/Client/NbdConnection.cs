using System.Net.Sockets;

namespace Nbd.Protocol;

/// <summary>
/// A connection whose handshake is complete: the server is in the transmission phase and <see cref="Socket"/> is
/// ready to be handed to the kernel (NBD_SET_SOCK). No byte of transmission has been read or written.
/// </summary>
public sealed class NbdConnection : IDisposable
{
    private Socket? _socket;

    internal NbdConnection(NbdExportInfo export, Socket socket)
    {
        Export = export;
        _socket = socket;
    }

    public NbdExportInfo Export { get; }

    /// <summary>The connected socket; still owned by this object until <see cref="DetachSocket"/>.</summary>
    public Socket Socket => _socket ?? throw new InvalidOperationException("The socket was detached or disposed.");

    /// <summary>Hands the socket over: the caller owns it afterwards and <see cref="Dispose"/> no longer closes it.</summary>
    public Socket DetachSocket()
    {
        var socket = Socket;
        _socket = null;
        return socket;
    }

    public void Dispose()
    {
        _socket?.Dispose();
        _socket = null;
    }
}

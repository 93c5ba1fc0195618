using System.Net.Sockets;
using Serilog.Core;
using Serilog.Debugging;
using Serilog.Events;

namespace NbdDaemon.Logging;

/// <summary>Serilog sink writing to journald's native socket, so structured properties become journal fields.</summary>
internal sealed class JournaldSink : ILogEventSink, IDisposable
{
    public const string DefaultSocketPath = "/run/systemd/journal/socket";
    public const string Identifier = "nbd-daemon";

    private readonly Socket _socket = new(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
    private readonly UnixDomainSocketEndPoint _endPoint;
    private readonly string _identifier;

    public JournaldSink(string socketPath = DefaultSocketPath, string identifier = Identifier)
    {
        _endPoint = new UnixDomainSocketEndPoint(socketPath);
        _identifier = identifier;
    }

    public void Emit(LogEvent logEvent)
    {
        byte[] datagram = JournaldFormat.Format(logEvent, _identifier);
        try
        {
            _socket.SendTo(datagram, _endPoint);
        }
        catch (SocketException ex)
        {
            // Logging must never take the daemon down; journald restarting loses these few lines.
            SelfLog.WriteLine("journald send failed ({0}): {1}", ex.SocketErrorCode, logEvent.RenderMessage(null));
        }
    }

    public void Dispose() => _socket.Dispose();
}

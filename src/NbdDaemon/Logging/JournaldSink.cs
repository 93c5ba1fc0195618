using System.Globalization;
using System.Net.Sockets;
using System.Text;
using Nbd.Kernel;
using Serilog.Core;
using Serilog.Debugging;
using Serilog.Events;

namespace NbdDaemon.Logging;

/// <summary>
/// Serilog sink writing to journald's native socket, so structured properties become journal fields. Never blocks: a
/// journald that does not read (stopped, restarting, its queue full) must not stall the mapping that logs, since its
/// state machine logs each transition on its own flow and the watchdog would not see a loop waiting there. Records
/// that find the socket full are dropped and counted, and the next record that goes through is preceded by one that
/// says how many were lost (journald itself drops the same way under its rate limit). A record larger than one datagram
/// (EMSGSIZE: over the socket's send buffer, about 208 KiB) goes in a sealed memfd instead, as sd_journal_sendv sends it.
/// </summary>
internal sealed class JournaldSink : ILogEventSink, IDisposable
{
    public const string DefaultSocketPath = "/run/systemd/journal/socket";
    public const string Identifier = "nbd-daemon";

    private readonly Socket _socket = new(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified) { Blocking = false };
    private readonly UnixDomainSocketEndPoint _endPoint;
    private readonly string _socketPath;
    private readonly string _identifier;
    private readonly Lock _lock = new();
    private long _dropped;

    public JournaldSink(string socketPath = DefaultSocketPath, string identifier = Identifier)
    {
        _endPoint = new UnixDomainSocketEndPoint(socketPath);
        _socketPath = socketPath;
        _identifier = identifier;
    }

    /// <summary>Records dropped because journald's socket was full, since the last one that went through.</summary>
    public long Dropped => Interlocked.Read(ref _dropped);

    public void Emit(LogEvent logEvent)
    {
        byte[] datagram = JournaldFormat.Format(logEvent, _identifier);
        lock (_lock)
        {
            if (_dropped > 0 && TrySend(DroppedNotice(_dropped)))
            {
                Interlocked.Exchange(ref _dropped, 0);
            }

            if (!TrySend(datagram))
            {
                Interlocked.Increment(ref _dropped);
            }
        }
    }

    private bool TrySend(byte[] datagram)
    {
        try
        {
            _socket.SendTo(datagram, _endPoint);
            return true;
        }
        catch (SocketException ex) when (ex.SocketErrorCode is SocketError.MessageSize or SocketError.NoBufferSpaceAvailable)
        {
            // Too large for a datagram: not a journald that does not read, so not counted as one.
            return TrySendInMemoryFile(datagram);
        }
        catch (SocketException ex)
        {
            // Logging must never take the daemon down, nor wait: journald restarting or not reading loses these lines.
            SelfLog.WriteLine("journald send failed ({0})", ex.SocketErrorCode);
            return false;
        }
    }

    private bool TrySendInMemoryFile(byte[] record)
    {
        try
        {
            UnixDescriptorPassing.SendSealedMemoryFile(_socketPath, record, "journal-record");
            return true;
        }
        catch (NbdKernelException ex)
        {
            SelfLog.WriteLine("journald send of a {0}-byte record in a memfd failed ({1})", record.Length, ex.Message);
            return false;
        }
    }

    private byte[] DroppedNotice(long count) => Encoding.UTF8.GetBytes(string.Create(
        CultureInfo.InvariantCulture,
        $"MESSAGE={count} log records dropped: journald was not reading\nPRIORITY=4\nSYSLOG_IDENTIFIER={_identifier}\nDROPPED_RECORDS={count}\n"));

    public void Dispose() => _socket.Dispose();
}

using System.Net;
using System.Net.Sockets;
using Nbd.Protocol;

namespace Nbd.Fuzz;

/// <summary>
/// Replays a reconnect case over real loopback TCP through the public <see cref="NbdClient.ConnectAsync"/>, the call
/// the daemon's reconnect loop makes: connect, blocking-socket stream, handshake on its own thread. The server sends
/// the script, half-closes, and drains what the client sends until the client hangs up, so the client sees exactly
/// the script and then EOF, as in memory. The outcome must be the in-memory one: chunking, the socket stream and the
/// connector must not change what the handshake decides. Stalled streams are skipped (a real stall costs a real
/// timeout).
/// </summary>
internal static class LoopbackReplay
{
    public static IEnumerable<Finding> Compare(FuzzCase c, string[] inMemory, TimeSpan deadline)
    {
        var options = new NbdClientOptions { ConnectTimeout = deadline, HandshakeTimeout = deadline };
        var findings = new List<Finding>();
        for (int i = 0; i < c.Streams.Length; i++)
        {
            if (c.Streams[i].Stall)
            {
                continue;
            }

            string outcome = Run(c.Streams[i].Bytes, options, deadline);
            if (outcome != inMemory[i])
            {
                findings.Add(new Finding(FindingKind.SocketMismatch, c.Id, i, $"in memory '{inMemory[i]}', over loopback TCP '{outcome}'"));
            }
        }

        return findings;
    }

    public static string Run(byte[] script, NbdClientOptions options, TimeSpan deadline)
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        var server = new Thread(() => Serve(listener, script, deadline)) { IsBackground = true, Name = "fuzz-loopback" };
        server.Start();

        var uri = NbdUri.Parse($"nbd://127.0.0.1:{((IPEndPoint)listener.LocalEndPoint!).Port}/{Corpus.ExportName}");
        var task = NbdClient.ConnectAsync(uri, options);
        string outcome;
        try
        {
            // The client's own timeouts are the deadline; twice that means it did not honour them.
            if (!task.Wait(2 * deadline))
            {
                outcome = "hang over loopback";
            }
            else
            {
                using var connection = task.Result;
                outcome = Outcome.Export(connection.Export);
            }
        }
        catch (AggregateException ex) when (ex.InnerException is not null)
        {
            outcome = Outcome.Of(ex.InnerException);
        }

        server.Join(2 * deadline);
        return outcome;
    }

    private static void Serve(Socket listener, byte[] script, TimeSpan deadline)
    {
        try
        {
            if (!listener.Poll(deadline, SelectMode.SelectRead))
            {
                return;
            }

            using var peer = listener.Accept();
            peer.ReceiveTimeout = (int)deadline.TotalMilliseconds;
            peer.SendTimeout = (int)deadline.TotalMilliseconds;
            try
            {
                peer.Send(script);
                peer.Shutdown(SocketShutdown.Send);
                var sink = new byte[4096];
                while (peer.Receive(sink) > 0)
                {
                }
            }
            catch (SocketException)
            {
                // The client hung up while the script was still going out: it had seen enough to decide.
            }
        }
        catch (Exception ex) when (ex is SocketException or ObjectDisposedException)
        {
        }
    }
}

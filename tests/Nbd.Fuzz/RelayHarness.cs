using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net.Sockets;
using Nbd.Kernel;
using Nbd.Protocol.Transmission;

namespace Nbd.Fuzz;

/// <summary>How the valid server the relay reconnects to handles the resent requests.</summary>
internal enum RelayOracle
{
    /// <summary>
    /// Answers each request before reading the next (a one-request-at-a-time server): blocks in send while its
    /// replies are not read, so a relay that resends without reading replies deadlocks against it.
    /// </summary>
    Sequential,

    /// <summary>Reads every resent request, then answers them all: never blocks the relay's resend.</summary>
    Pipelined,

    /// <summary>
    /// No valid server: the kernel sends NBD_CMD_DISC after its requests. The relay must pass DISC on, forward the
    /// hostile server's well-formed replies, end Disconnected by itself once they stop (a bad reply, the server's
    /// close), close the kernel's end on a reply boundary, and never reconnect.
    /// </summary>
    Disconnect,
}

/// <summary>What one relay case did, and what was wrong with it.</summary>
internal sealed class RelayCaseResult
{
    public List<(FindingKind Kind, string Detail)> Problems { get; } = [];

    /// <summary>Why the relay dropped the hostile connection, as a category (<see cref="RelayHarness.Category"/>).</summary>
    public string Lost { get; set; } = NotDropped;

    /// <summary>The first server answered everything and the case ended before the relay saw its EOF.</summary>
    public const string NotDropped = "not dropped before the case ended";

    public string? LostDetail { get; set; }

    /// <summary>Bytes the relay's server thread had allocated when it dropped the hostile connection; -1 = not measured.</summary>
    public long HostileAllocated { get; set; } = -1;

    public long AllocationBound { get; set; }

    public int FromHostile { get; set; }

    public int HostileErrors { get; set; }

    public int FromValid { get; set; }

    public long Reconnects { get; set; }

    public TimeSpan Duration { get; set; }
}

/// <summary>
/// Runs one relay case over real AF_UNIX socket pairs (<see cref="NbdSocketPair"/>, what the daemon hands the driver):
/// this thread plays the kernel (sends every request, then reads the replies), a server thread plays the hostile
/// first server (reads the requests, answers with the case's stream, closes) and then the valid one the relay's
/// Reconnect delegate connects to (answers every request correctly from <see cref="RelayDisk"/>).
/// </summary>
internal static class RelayHarness
{
    /// <summary>Disconnect oracle: how the relay ended, in place of why it dropped the hostile connection.</summary>
    public const string EndedAfterDiscAllAnswered = "DISC: ended once every request had its reply";

    public const string EndedAfterDiscOwed = "DISC: ended when the server's replies stopped, requests unanswered";

    /// <summary>Fixed part of what the server thread may allocate: its 64 KiB receive buffer, a joined send, a failure.</summary>
    public const long FixedAllocation = 256 * 1024;

    public static RelayCaseResult Run(RelayCase c, TimeSpan deadline, RelayOracle oracle = RelayOracle.Sequential)
    {
        long started = Stopwatch.GetTimestamp();
        var result = new RelayCaseResult { AllocationBound = FixedAllocation + (2 * c.ReadBytes) };
        var state = new CaseState(c, deadline, oracle, result);
        var (kernelEnd, relayKernelSide) = NbdSocketPair.Create();
        var (hostileRelaySide, hostileEnd) = NbdSocketPair.Create();
        SetTimeouts(kernelEnd, deadline);
        SetTimeouts(hostileEnd, deadline);
        var options = new NbdRelayOptions
        {
            Reconnect = state.Reconnect,
            GiveUpAfter = deadline,
            RetryInterval = TimeSpan.FromMilliseconds(10),
            Events = state.OnEvent,
            Name = "fuzz-relay " + c.Id,
        };
        var relay = new NbdRelay(relayKernelSide, hostileRelaySide, options);
        var server = new Thread(() => state.Serve(hostileEnd)) { IsBackground = true, Name = "fuzz-server " + c.Id };
        try
        {
            relay.Start();
            server.Start();
            PlayKernel(c, kernelEnd, state);
            if (oracle == RelayOracle.Disconnect)
            {
                // The kernel saw its end close: the relay recorded why before it closed it.
                if (!relay.Completion.Wait(deadline))
                {
                    state.Problem(FindingKind.Hang, "the relay did not end after NBD_CMD_DISC");
                }
                else if (relay.Completion.Result is { Reason: not NbdRelayEndReason.Disconnected } end)
                {
                    state.Problem(FindingKind.RelayEnded, $"after NBD_CMD_DISC the relay ended {end.Reason}: {end.Detail}");
                }
                else
                {
                    result.Lost = result.FromHostile == c.Requests.Length ? EndedAfterDiscAllAnswered : EndedAfterDiscOwed;
                }
            }
            else if (relay.Completion.IsCompleted)
            {
                NbdRelayEnd end = relay.Completion.Result;
                state.Problem(FindingKind.RelayEnded, $"the relay ended by itself: {end.Reason}: {end.Detail}");
            }
        }
        finally
        {
            relay.Dispose();
            state.Connections.CompleteAdding();
        }

        if (!server.Join(deadline))
        {
            state.Problem(FindingKind.Hang, "the server thread did not finish after the relay was disposed");
        }

        // Disposing closed the relay's end: anything still readable was sent after the last expected reply.
        try
        {
            var extra = new byte[64];
            int n = kernelEnd.Receive(extra);
            if (n > 0)
            {
                state.Problem(FindingKind.MalformedReply, $"{n}+ bytes after the last reply: {Convert.ToHexString(extra, 0, n)}");
            }
        }
        catch (SocketException e)
        {
            state.Problem(FindingKind.Hang, $"the kernel's end neither closed nor sent after the relay was disposed: {e.SocketErrorCode}");
        }

        kernelEnd.Dispose();
        NbdRelayEndReason expectedEnd = oracle == RelayOracle.Disconnect ? NbdRelayEndReason.Disconnected : NbdRelayEndReason.Stopped;
        if (relay.Completion.IsCompleted && relay.Completion.Result.Reason != expectedEnd && result.Problems.Count == 0)
        {
            state.Problem(FindingKind.RelayEnded, $"ended {relay.Completion.Result.Reason}: {relay.Completion.Result.Detail}");
        }

        result.Reconnects = relay.Reconnects;
        if (result.HostileAllocated > result.AllocationBound)
        {
            state.Problem(FindingKind.AllocationOverBound, $"the relay's server thread allocated {result.HostileAllocated} B on the hostile connection (bound {result.AllocationBound} B = {FixedAllocation} + 2 x {c.ReadBytes} read bytes); it dropped it because: {result.LostDetail}");
        }

        result.Duration = Stopwatch.GetElapsedTime(started);
        return result;
    }

    /// <summary>The NBD_CMD_DISC the kernel sends after its requests in <see cref="RelayOracle.Disconnect"/> cases.</summary>
    public static readonly byte[] Disc = new RelayRequest(-1, NbdCommand.Disconnect, 0, 0xD15C0000D15C, 0, 0, null).Header();

    /// <summary>
    /// Sends every request (headers and write data, back to back, as the driver queues them), then checks each reply.
    /// With DISC after the requests, the replies may stop early, but only with an orderly end between two replies.
    /// </summary>
    private static void PlayKernel(RelayCase c, Socket kernel, CaseState state)
    {
        bool disconnect = state.Oracle == RelayOracle.Disconnect;
        try
        {
            foreach (var request in c.Requests)
            {
                SendAll(kernel, request.Header());
                if (request.Data is { } payload)
                {
                    SendAll(kernel, payload);
                }
            }

            if (disconnect)
            {
                SendAll(kernel, Disc);
            }
        }
        catch (SocketException e)
        {
            state.Problem(e.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock ? FindingKind.Hang : FindingKind.RelayEnded, $"sending the requests failed: {e.SocketErrorCode}");
            return;
        }

        var outstanding = c.Requests.ToDictionary(r => r.Cookie);
        var answered = new HashSet<ulong>();
        var header = new byte[NbdTransmission.SimpleReplyLength];
        byte[]? data = null;
        byte[]? expected = null;
        for (int received = 0; received < c.Requests.Length; received++)
        {
            string? failure = ReadExactly(kernel, header);
            if (failure == "EOF" && disconnect)
            {
                int owed = WellFormedReplies(c);
                if (received != owed)
                {
                    state.Problem(FindingKind.MissingReply, $"after NBD_CMD_DISC the kernel got {received} replies, but the server sent {owed} well-formed ones before its stream went wrong or ended");
                }

                return;
            }

            if (failure is not null)
            {
                state.Problem(failure == "EOF" ? FindingKind.MissingReply : FindingKind.Hang,
                    $"{failure} after {received} of {c.Requests.Length} replies; unanswered: {string.Join(", ", outstanding.Values.Select(r => r.Sequence))}");
                return;
            }

            uint magic = BinaryPrimitives.ReadUInt32BigEndian(header);
            uint error = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(4));
            ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(8));
            if (magic != NbdTransmission.SimpleReplyMagic)
            {
                state.Problem(FindingKind.MalformedReply, $"reply {received}: magic 0x{magic:x8} reached the kernel: {Convert.ToHexString(header)}");
                return;
            }

            if (!outstanding.Remove(cookie, out var request))
            {
                state.Problem(answered.Contains(cookie) ? FindingKind.DuplicateReply : FindingKind.MalformedReply,
                    $"reply {received}: cookie 0x{cookie:x16} {(answered.Contains(cookie) ? "answered already" : "never sent")} reached the kernel");
                return;
            }

            answered.Add(cookie);
            bool fromValid = state.AnsweredByValidServer(cookie);
            int length = error == 0 ? request.ReplyDataLength : 0;
            if (length > 0)
            {
                data = data is not null && data.Length >= length ? data : new byte[Math.Max(length, 4096)];
                failure = ReadExactly(kernel, data.AsSpan(0, length));
                if (failure is not null)
                {
                    state.Problem(failure == "EOF" ? FindingKind.MalformedReply : FindingKind.Hang, $"reply {received} ({request}): {failure} inside its {length} data bytes");
                    return;
                }
            }

            if (fromValid)
            {
                state.Result.FromValid++;
                if (error != 0)
                {
                    state.Problem(FindingKind.WrongData, $"{request}: error {error}, but the valid server answered it with success");
                }
                else if (length > 0)
                {
                    expected = expected is not null && expected.Length >= length ? expected : new byte[Math.Max(length, 4096)];
                    RelayDisk.Fill(expected.AsSpan(0, length), request.Offset);
                    if (!data.AsSpan(0, length).SequenceEqual(expected.AsSpan(0, length)))
                    {
                        state.Problem(FindingKind.WrongData, $"{request}: the data reaching the kernel is not what the valid server sent");
                    }
                }
            }
            else
            {
                state.Result.FromHostile++;
                if (error != 0)
                {
                    state.Result.HostileErrors++;
                }
            }
        }
    }

    /// <summary>
    /// How many replies at the start of the hostile stream the relay must forward: simple reply magic, a cookie still in
    /// flight, and (a successful read) all of the read's data; counting stops at the first that is not, or when every
    /// request has its reply. The relay's own rules, written from the protocol, not from its code.
    /// </summary>
    public static int WellFormedReplies(RelayCase c)
    {
        var inFlight = c.Requests.ToDictionary(r => r.Cookie);
        ReadOnlySpan<byte> stream = c.Stream;
        int count = 0;
        while (inFlight.Count > 0 && stream.Length >= NbdTransmission.SimpleReplyLength)
        {
            uint magic = BinaryPrimitives.ReadUInt32BigEndian(stream);
            uint error = BinaryPrimitives.ReadUInt32BigEndian(stream[4..]);
            ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(stream[8..]);
            if (magic != NbdTransmission.SimpleReplyMagic || !inFlight.Remove(cookie, out var request))
            {
                break;
            }

            int length = NbdTransmission.SimpleReplyLength + (error == 0 ? request.ReplyDataLength : 0);
            if (stream.Length < length)
            {
                break;
            }

            stream = stream[length..];
            count++;
        }

        return count;
    }

    /// <summary>null when filled, else "EOF" or the socket error (a timeout is the deadline).</summary>
    private static string? ReadExactly(Socket socket, Span<byte> destination)
    {
        try
        {
            while (!destination.IsEmpty)
            {
                int n = socket.Receive(destination);
                if (n == 0)
                {
                    return "EOF";
                }

                destination = destination[n..];
            }

            return null;
        }
        catch (SocketException e)
        {
            return e.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock ? "no reply within the deadline" : e.SocketErrorCode.ToString();
        }
    }

    private static void SendAll(Socket socket, ReadOnlySpan<byte> bytes)
    {
        while (!bytes.IsEmpty)
        {
            bytes = bytes[socket.Send(bytes)..];
        }
    }

    private static void SetTimeouts(Socket socket, TimeSpan deadline)
    {
        socket.ReceiveTimeout = (int)deadline.TotalMilliseconds;
        socket.SendTimeout = (int)deadline.TotalMilliseconds;
    }

    /// <summary>The relay's reason for dropping a server connection, without the per-case numbers.</summary>
    public static string Category(string reason) => reason switch
    {
        _ when reason.Contains("structured reply", StringComparison.Ordinal) => "structured reply",
        _ when reason.StartsWith("server sent reply magic", StringComparison.Ordinal) => "bad reply magic",
        _ when reason.Contains("which no request in flight has", StringComparison.Ordinal) => "cookie not in flight",
        _ when reason.Contains("inside a reply", StringComparison.Ordinal) => "EOF inside a reply",
        _ when reason.StartsWith("the server closed", StringComparison.Ordinal) => "EOF between replies",
        _ when reason.Contains("NBD_ESHUTDOWN", StringComparison.Ordinal) => "ESHUTDOWN",
        _ => reason,
    };

    /// <summary>Everything the kernel thread, the server thread and the relay's callbacks share for one case.</summary>
    private sealed class CaseState(RelayCase c, TimeSpan deadline, RelayOracle oracle, RelayCaseResult result)
    {
        public RelayOracle Oracle => oracle;

        private readonly Lock _lock = new();
        private readonly HashSet<ulong> _validAnswered = [];
        private readonly Dictionary<ulong, RelayRequest> _byCookie = c.Requests.ToDictionary(r => r.Cookie);
        private int _lost;
        private int _resendCount;

        public RelayCaseResult Result => result;

        public BlockingCollection<Socket> Connections { get; } = [];

        public void Problem(FindingKind kind, string detail)
        {
            lock (_lock)
            {
                result.Problems.Add((kind, detail));
            }
        }

        public bool AnsweredByValidServer(ulong cookie)
        {
            lock (_lock)
            {
                return _validAnswered.Contains(cookie);
            }
        }

        /// <summary>The relay's Reconnect: a new pair, one end for the valid server, the other for the relay.</summary>
        public Task<Socket> Reconnect(CancellationToken cancellationToken)
        {
            if (oracle == RelayOracle.Disconnect)
            {
                Problem(FindingKind.BadForward, "the relay reconnected after the kernel's NBD_CMD_DISC");
            }

            var (relaySide, serverSide) = NbdSocketPair.Create();
            SetTimeouts(serverSide, deadline);
            Connections.Add(serverSide, CancellationToken.None);
            return Task.FromResult(relaySide);
        }

        /// <summary>Runs on the relay's threads: the first server loss measures what the server thread allocated so far.</summary>
        public void OnEvent(NbdRelayEvent e)
        {
            if (e is not NbdRelayServerLost lost)
            {
                return;
            }

            if (Interlocked.Increment(ref _lost) == 1)
            {
                // Raised before Reconnect, whose queue hands the connection to the server thread: visible there.
                _resendCount = lost.InFlight;
                // The relay's server thread is new per relay: everything it allocated went into the hostile connection.
                result.HostileAllocated = GC.GetAllocatedBytesForCurrentThread();
                result.Lost = Category(lost.Reason);
                result.LostDetail = lost.Reason;
            }
            else
            {
                Problem(FindingKind.ValidServerDropped, $"the relay dropped the valid server: {lost.Reason}");
            }
        }

        public void Serve(Socket hostile)
        {
            try
            {
                ServeHostile(hostile);
                foreach (Socket connection in Connections.GetConsumingEnumerable())
                {
                    using (connection)
                    {
                        ServeValid(connection);
                    }
                }
            }
            catch (Exception e)
            {
                Problem(FindingKind.UnexpectedException, "server thread: " + e);
            }
        }

        /// <summary>Reads every request (they must arrive exactly as the kernel sent them), then sends the case's stream and closes.</summary>
        private void ServeHostile(Socket hostile)
        {
            using (hostile)
            {
                var header = new byte[NbdTransmission.RequestLength];
                foreach (var request in c.Requests)
                {
                    if (ReadExactly(hostile, header) is string failure)
                    {
                        Problem(failure == "EOF" ? FindingKind.BadForward : FindingKind.Hang, $"the first server got {request.Sequence} of {c.Requests.Length} requests: {failure}");
                        return;
                    }

                    if (!header.AsSpan().SequenceEqual(request.Header()))
                    {
                        Problem(FindingKind.BadForward, $"the first server got {Convert.ToHexString(header)} for {request}");
                        return;
                    }

                    if (request.Data is { } data && !ReadAndCompare(hostile, data, request))
                    {
                        return;
                    }
                }

                if (oracle == RelayOracle.Disconnect)
                {
                    if (ReadExactly(hostile, header) is string failure)
                    {
                        Problem(FindingKind.BadForward, $"the first server never got the kernel's NBD_CMD_DISC: {failure}");
                        return;
                    }

                    if (!header.AsSpan().SequenceEqual(Disc))
                    {
                        Problem(FindingKind.BadForward, $"the first server got {Convert.ToHexString(header)} for the kernel's NBD_CMD_DISC");
                        return;
                    }
                }

                try
                {
                    for (int at = 0; at < c.Stream.Length;)
                    {
                        at += hostile.Send(c.Stream.AsSpan(at, Math.Min(c.MaxChunk, c.Stream.Length - at)));
                    }

                    hostile.Shutdown(SocketShutdown.Send);
                }
                catch (SocketException)
                {
                    // The relay dropped the connection before the stream ended: what it should do with bad replies.
                }
            }
        }

        /// <summary>
        /// A correct server: every request must be one the kernel sent, byte for byte, not yet answered, and arrive in
        /// the kernel's order; every answer is success with the disk's data. Pipelined, it reads the whole resend
        /// (the in-flight count of the loss) before it answers; sequential, it answers each request before it reads
        /// the next, and blocks in send while its replies are not read.
        /// </summary>
        private void ServeValid(Socket connection)
        {
            var header = new byte[NbdTransmission.RequestLength];
            int lastSequence = -1;
            var batch = new List<RelayRequest>();
            int expected = oracle == RelayOracle.Pipelined ? _resendCount : 1;
            while (true)
            {
                string? failure = ReadExactly(connection, header);
                if (failure == "EOF")
                {
                    return;
                }

                if (failure is not null)
                {
                    Problem(FindingKind.Hang, $"the valid server waited for a request: {failure}");
                    return;
                }

                ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(8));
                if (!_byCookie.TryGetValue(cookie, out var request) || !header.AsSpan().SequenceEqual(request.Header()))
                {
                    Problem(FindingKind.BadForward, $"the valid server got {Convert.ToHexString(header)}, not a request the kernel sent");
                    return;
                }

                if (request.Data is { } data && !ReadAndCompare(connection, data, request))
                {
                    return;
                }

                lock (_lock)
                {
                    if (!_validAnswered.Add(cookie))
                    {
                        result.Problems.Add((FindingKind.BadForward, $"the valid server got {request} twice"));
                        return;
                    }
                }

                if (request.Sequence < lastSequence)
                {
                    Problem(FindingKind.BadForward, $"resent out of the kernel's order: {request} after #{lastSequence}");
                }

                lastSequence = request.Sequence;
                batch.Add(request);
                if (batch.Count < expected)
                {
                    continue;
                }

                try
                {
                    foreach (var answered in batch)
                    {
                        SendAll(connection, RelayCaseGenerator.Reply(NbdTransmission.SimpleReplyMagic, 0, answered.Cookie, answered.Offset, answered.ReplyDataLength));
                    }
                }
                catch (SocketException e)
                {
                    if (e.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock)
                    {
                        Problem(FindingKind.Hang, $"the valid server could not send its reply to {batch[0]} within the deadline: the relay does not read");
                    }

                    return;
                }

                batch.Clear();
                expected = 1;
            }
        }

        private bool ReadAndCompare(Socket socket, byte[] expected, RelayRequest request)
        {
            var data = new byte[expected.Length];
            if (ReadExactly(socket, data) is string failure)
            {
                Problem(failure == "EOF" ? FindingKind.BadForward : FindingKind.Hang, $"{request}: write data: {failure}");
                return false;
            }

            if (!data.AsSpan().SequenceEqual(expected))
            {
                Problem(FindingKind.BadForward, $"{request}: the server got other write data than the kernel sent");
                return false;
            }

            return true;
        }
    }
}

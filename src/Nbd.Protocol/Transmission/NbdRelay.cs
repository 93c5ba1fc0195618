using System.Buffers;
using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;

namespace Nbd.Protocol.Transmission;

/// <summary>
/// Carries the driver's transmission phase between the kernel's end of a socket pair and a server connection, and
/// hides a lost server connection from the kernel: every request stays remembered (write data included) until its
/// reply went back to the kernel; when the server connection ends, the relay opens a new one
/// (<see cref="NbdRelayOptions.Reconnect"/>) and sends the unanswered requests again, in their order, on it.
/// </summary>
/// <remarks>
/// Why: the driver resends a request that was in flight on a dead connection only when that request's own timeout
/// fires, so without the relay a connection cut costs every in-flight request up to the request timeout even when
/// the server accepts again at once. Resending is what the driver itself does on a timeout (NBD requests are
/// idempotent at the block level); the cost is one copy of each payload through user space.
/// Two dedicated threads with blocking socket calls (never .NET's epoll loop, see BlockingSocketStream): one reads
/// requests from the kernel and sends them to the server, one reads replies from the server, sends them to the kernel
/// and, when the server connection ends, reconnects; a short-lived third one resends the unanswered requests on a new
/// connection while the server thread already reads its replies. Each reply is read completely before a byte of it
/// goes to the kernel, so a connection that dies inside a reply never leaves the kernel's stream half-written. Only the
/// server thread reconnects; a failed send merely shuts the connection down so that its reader notices.
/// </remarks>
public sealed class NbdRelay : IDisposable
{
    /// <summary>The longest a .NET timer runs (2^32 - 2 ms, about 49.7 days); GiveUpAfter may be longer ("never").</summary>
    private static readonly TimeSpan LongestTimer = TimeSpan.FromMilliseconds(uint.MaxValue - 1);

    /// <summary>
    /// How often the kernel thread, waiting for the next request, looks whether a hand-over asks it to stop reading.
    /// A blocked recv(2) cannot be woken without ending the connection, so the wait is a poll(2) with this timeout.
    /// </summary>
    private static readonly TimeSpan HandOverTick = TimeSpan.FromMilliseconds(50);

    /// <summary>A connection that ends sooner than this after it took over, having answered nothing, ended no outage.</summary>
    private static readonly TimeSpan QuickDrop = TimeSpan.FromSeconds(1);

    /// <summary>After DISC with <see cref="NbdRelayOptions.GiveUpAfter"/> zero: how long the server may take to answer what it owes.</summary>
    public static readonly TimeSpan DisconnectWaitWithoutReconnect = TimeSpan.FromSeconds(30);

    private readonly Socket _kernel;
    private readonly NbdRelayOptions _options;
    private readonly Lock _lock = new();
    private readonly Lock _sendLock = new();
    private readonly Dictionary<ulong, Pending> _pending = [];
    private readonly CancellationTokenSource _stop = new();
    private readonly TaskCompletionSource<NbdRelayEnd> _ended = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly Thread _kernelThread;
    private readonly Thread _serverThread;

    /// <summary>Set by the kernel thread once it stopped reading between two requests, with nothing of a request read.</summary>
    private readonly ManualResetEventSlim _kernelQuiet = new();

    // The kernel's requests, kept in the ring they were received into until answered (owned by the kernel thread).
    private readonly RequestRing _ring;

    // The requests in the ring in stream order, and where the oldest one not yet released starts (under _lock).
    private readonly Queue<Pending> _order = new();
    private long _tail;

    // Set whenever _tail moves (under _lock): the kernel thread waits on it while the ring is full.
    private readonly ManualResetEventSlim _room = new(true);
    // A journal to recover from after this process is killed, and a descriptor of the driver's end to count the reply
    // bytes the driver consumed (null: none kept; a kill costs the requests in flight their Timeout).
    private readonly RelayJournal? _journal;
    private readonly Socket? _driverSide;

    // Reply bytes sent to the kernel so far (the server thread's, and the recovery's before it starts).
    private long _replied;

    // Created by Journaled: the server thread starts by sending what is pending on this connection (null: a new one).
    private readonly bool _startWithResend;
    private readonly Socket? _firstServer;

    // Set once a connection is current (at once without a journal): a journaled relay's kernel thread waits for it, so
    // that what it reads (an NBD_CMD_DISC among it) goes out behind what was pending, not into a relay with no server.
    private readonly ManualResetEventSlim _firstConnection;

    private Thread? _resender;
    private Socket? _server;
    private Socket? _lastServer;
    private int _generation;
    private long _sequence;
    private long _reconnects;

    /// <summary>Replies taken out of <see cref="_pending"/> and not yet written to the kernel (under the lock).</summary>
    private int _delivering;

    /// <summary>The kernel sent NBD_CMD_DISC: no request follows, and the relay ends once every reply went back.</summary>
    private bool _disconnecting;

    /// <summary>After DISC: ends the relay if the server neither answers nor closes within GiveUpAfter.</summary>
    private ITimer? _disconnectDeadline;

    /// <summary><see cref="TryHandOver"/> asked the kernel thread to stop reading at the next request boundary.</summary>
    private volatile bool _handingOver;

    /// <summary>Orders <see cref="TryHandOver"/>'s claim of our end against <see cref="End"/>'s shutdown of it.</summary>
    private readonly Lock _endLock = new();

    /// <summary>Our end went (or is going) to another process: no End may shut it down (under <see cref="_endLock"/>).</summary>
    private bool _kernelSideKept;

    private int _started;
    private int _disposed;

    /// <param name="kernelSide">Our end of the pair whose other end was handed to the driver; the relay owns it.</param>
    /// <param name="server">A connection in transmission phase; the relay owns it.</param>
    /// <param name="options">How to reconnect.</param>
    public NbdRelay(Socket kernelSide, Socket server, NbdRelayOptions options)
        : this(kernelSide, server ?? throw new ArgumentNullException(nameof(server)), options, journal: null, driverSide: null)
    {
    }

    private NbdRelay(Socket kernelSide, Socket? server, NbdRelayOptions options, RelayJournal? journal, Socket? driverSide)
    {
        ArgumentNullException.ThrowIfNull(kernelSide);
        ArgumentNullException.ThrowIfNull(options);

        // Timeout.InfiniteTimeSpan is -1 ms: as GiveUpAfter it would give up at once, as RetryInterval pause forever.
        ArgumentOutOfRangeException.ThrowIfLessThan(options.GiveUpAfter, TimeSpan.Zero, "options.GiveUpAfter");
        ArgumentOutOfRangeException.ThrowIfLessThan(options.RetryInterval, TimeSpan.Zero, "options.RetryInterval");
        ArgumentOutOfRangeException.ThrowIfGreaterThan(options.RetryInterval, LongestTimer, "options.RetryInterval");
        _kernel = kernelSide;
        _options = options;
        _journal = journal;
        _firstConnection = new ManualResetEventSlim(initialState: journal is null);
        _driverSide = driverSide;
        if (journal is null)
        {
            _server = server;
            _lastServer = server;
            _ring = new RequestRing(options.RequestBufferBytes);
        }
        else
        {
            _startWithResend = true;
            _firstServer = server;
            _ring = new RequestRing(journal.Ring);
        }

        _kernelThread = new Thread(() => Guarded(KernelLoop)) { IsBackground = true, Name = options.Name + " k" };
        _serverThread = new Thread(() => Guarded(ServerLoop)) { IsBackground = true, Name = options.Name + " s" };
    }

    /// <summary>
    /// A relay that a successor can take up after this process is killed anywhere (SIGKILL, a crash): it keeps the
    /// kernel's requests in <paramref name="journal"/>'s ring and records there what a successor needs to know which
    /// replies went out. On a <see cref="JournalState.New"/> journal it starts counting both streams; on an
    /// <see cref="JournalState.Armed"/> one it recovers first: finishes a reply the kill cut off, and sends every request
    /// the kernel still waits for on <paramref name="server"/> (null: on a new connection, through
    /// <see cref="NbdRelayOptions.Reconnect"/>). The relay owns all it is given; <paramref name="driverSide"/> is a
    /// descriptor of the driver's end of the pair (the driver reads it; the relay only counts on it). An
    /// <see cref="InvalidDataException"/> naming the problem when the journal cannot be recovered from (abandoned, or not
    /// consistent with the sockets), a <see cref="SocketException"/> when our end failed during the recovery; either way
    /// our end is shut down, so the driver sees a dead connection and resends after its timeout, as without a journal,
    /// and everything given is disposed.
    /// </summary>
    internal static NbdRelay Journaled(Socket kernelSide, Socket driverSide, RelayJournal journal, Socket? server, NbdRelayOptions options)
    {
        ArgumentNullException.ThrowIfNull(driverSide);
        ArgumentNullException.ThrowIfNull(journal);
        var relay = new NbdRelay(kernelSide, server, options, journal, driverSide);
        try
        {
            // The option belongs to the socket: a predecessor killed inside a recovery's bounded send left it set.
            kernelSide.SendTimeout = 0;
            if (journal.State == JournalState.Abandoned)
            {
                throw new InvalidDataException("the relay journal was abandoned (a request larger than its ring): the requests in flight wait for the driver's timeout");
            }

            if (journal.State == JournalState.New)
            {
                // Nothing of either stream may have been consumed or sent yet: both counters start at 0.
                if (driverSide.Available > 0)
                {
                    throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the driver's end has {driverSide.Available} bytes unread: a new relay journal starts where nothing was sent to the driver yet"));
                }

                journal.OurCounter.Arm(kernelSide, 0);
                journal.DriverCounter.Arm(driverSide, 0);
                journal.State = JournalState.Armed;
            }
            else
            {
                relay.Recover();
            }

            return relay;
        }
        catch
        {
            relay.Dispose();
            throw;
        }
    }

    /// <summary>Completes once, with the reason the relay ended; never faults.</summary>
    public Task<NbdRelayEnd> Completion => _ended.Task;

    /// <summary>Requests sent by the kernel and not yet answered.</summary>
    public int InFlight
    {
        get
        {
            lock (_lock)
            {
                return _pending.Count;
            }
        }
    }

    /// <summary>A journaled relay whose journal was abandoned (a request larger than its ring): a successor would refuse it.</summary>
    internal bool JournalAbandoned => _journal is { State: JournalState.Abandoned };

    /// <summary>What <see cref="Journaled"/> found and did when it recovered from a killed predecessor; else null.</summary>
    internal RelayRecovery? Recovered { get; private set; }

    /// <summary>Server connections that took over after the first one.</summary>
    public long Reconnects => Interlocked.Read(ref _reconnects);

    public void Start()
    {
        if (Interlocked.Exchange(ref _started, 1) != 0)
        {
            throw new InvalidOperationException("The relay was started already.");
        }

        _kernelThread.Start();
        _serverThread.Start();
    }

    /// <summary>Stops both directions, closes our end and the server connection, and waits for the threads.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        End(new NbdRelayEnd(NbdRelayEndReason.Stopped, "stopped"));
        if (Volatile.Read(ref _started) != 0)
        {
            _kernelThread.Join();
            _serverThread.Join();

            // Only the server thread starts resenders: after its end this field is final.
            _resender?.Join();
        }

        _kernel.Dispose();
        lock (_lock)
        {
            _disconnectDeadline?.Dispose();
            _server?.Dispose();
            _lastServer?.Dispose();
            _pending.Clear();
            _order.Clear();
        }

        // Every thread that read a request from the ring has ended.
        _ring.Dispose();
        _journal?.Dispose();
        _driverSide?.Dispose();
        _firstServer?.Dispose();
        _stop.Dispose();
        _kernelQuiet.Dispose();
        _room.Dispose();
        _firstConnection.Dispose();
    }

    /// <summary>
    /// Hands the kernel's connection over to another process without a byte of the kernel's stream lost or cut: stops
    /// reading requests at a request boundary (nothing of the next one read), waits until every reply owed went back to
    /// the kernel, then gives our end to <paramref name="keep"/> (which must pass it on, e.g. to systemd's file
    /// descriptor store, before it returns) and ends <see cref="NbdRelayEndReason.HandedOver"/> without shutting the
    /// kernel's end down. A relay created over the received end resumes exactly where this one stopped. Requests the
    /// kernel sends meanwhile wait in the socket. False, with nothing given away, when that point is not reached within
    /// <paramref name="limit"/> (a server that does not answer) or when the relay ended or was never started; an
    /// exception from <paramref name="keep"/> propagates. Either way the relay reads no further request: the owner
    /// disposes it as usual, and the driver sees a dead connection.
    /// </summary>
    public bool TryHandOver(TimeSpan limit, Action<Socket> keep)
    {
        ArgumentNullException.ThrowIfNull(keep);
        if (Volatile.Read(ref _started) == 0 || _ended.Task.IsCompleted)
        {
            return false;
        }

        _handingOver = true;
        TimeProvider time = _options.TimeProvider;
        long since = time.GetTimestamp();
        while (!(_kernelQuiet.IsSet && Owed() == 0))
        {
            if (_ended.Task.IsCompleted || time.GetElapsedTime(since) >= limit)
            {
                return false;
            }

            _kernelQuiet.Wait(HandOverTick);
            if (_kernelQuiet.IsSet && Owed() != 0)
            {
                Thread.Sleep(HandOverTick / 5);
            }
        }

        // Claimed before it is passed on: an End from another thread meanwhile (the give-up clock, a failure) would
        // shut the socket down, and shutdown(2) acts on the socket, so the copy just stored would be dead too.
        lock (_endLock)
        {
            if (_ended.Task.IsCompleted)
            {
                return false;
            }

            _kernelSideKept = true;
        }

        try
        {
            keep(_kernel);
        }
        catch
        {
            lock (_endLock)
            {
                _kernelSideKept = false;
            }

            throw;
        }

        End(new NbdRelayEnd(NbdRelayEndReason.HandedOver, "handed over between two requests, every reply delivered"), shutDownKernelSide: false);
        return true;
    }

    /// <summary>
    /// A journaled relay stops wherever it is, without shutting our end down: what its journal holds lets a successor
    /// carry the kernel's connection on from any point, as after a kill (a reply cut off is finished, the requests not
    /// answered are resent). For a stop that leaves the device when <see cref="TryHandOver"/> found replies still owed.
    /// False when the relay had ended already (its end may be shut down: nothing to carry on) or its journal was
    /// abandoned; the owner disposes it as usual either way.
    /// </summary>
    internal bool TryDetach(string why)
    {
        if (_journal is null || _journal.State != JournalState.Armed)
        {
            return false;
        }

        lock (_endLock)
        {
            if (_ended.Task.IsCompleted)
            {
                return false;
            }

            _kernelSideKept = true;
        }

        End(new NbdRelayEnd(NbdRelayEndReason.HandedOver, why), shutDownKernelSide: false);
        return true;
    }

    /// <summary>
    /// A relay thread's body: an exception nobody expected (a bug, a throwing <see cref="NbdRelayOptions.IsPermanent"/>)
    /// ends this relay, and the driver sees a dead connection, instead of taking the whole daemon down.
    /// </summary>
    private void Guarded(Action body)
    {
        try
        {
            body();
        }
#pragma warning disable CA1031 // One relay's failure must not end the process (and every other mapping with it).
        catch (Exception e)
#pragma warning restore CA1031
        {
            End(new NbdRelayEnd(NbdRelayEndReason.Failed, "relay failed: " + e.Message, e));
        }
    }

    private void KernelLoop()
    {
        Span<byte> header = stackalloc byte[NbdTransmission.RequestLength];
        try
        {
            if (!WaitForFirstConnection())
            {
                return;
            }

            while (!_stop.IsCancellationRequested)
            {
                if (_ring.Unparsed >= header.Length)
                {
                    _ring.Peek(header);
                    NbdRequestHeader request = NbdTransmission.ReadRequest(header);
                    if (Refuse(request) is string why)
                    {
                        End(new NbdRelayEnd(NbdRelayEndReason.KernelProtocolError, why));
                        return;
                    }

                    int length = WireLength(request);
                    if (_ring.Unparsed >= length)
                    {
                        if (!Carry(request, _ring.Take(length)))
                        {
                            return;
                        }

                        continue;
                    }

                    // A request larger than the ring (queue/max_sectors_kb above about 512 KiB: an admin raised it, or
                    // a kernel whose default is larger than 6.1's 128 KiB): room for two of them.
                    if (length > _ring.Capacity)
                    {
                        AbandonJournal(string.Create(CultureInfo.InvariantCulture, $"a request of {length} bytes is larger than the journal's ring ({_ring.Capacity} bytes)"));
                        _ring.Grow(Math.Max(2 * _ring.Capacity, 2 * length));
                    }
                }
                else if (_ring.Unparsed == 0 && !WaitForRequest())
                {
                    return;
                }

                if (!Receive())
                {
                    return;
                }
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            End(new NbdRelayEnd(NbdRelayEndReason.KernelClosed, "the kernel's end failed: " + e.Message, e));
        }
    }

    /// <summary>
    /// A journaled relay's kernel thread before a connection is current: waits for one (true), and meanwhile looks for
    /// the kernel hanging up, as <see cref="WaitForRoom"/> does (false: the relay ended).
    /// </summary>
    private bool WaitForFirstConnection()
    {
        while (!_firstConnection.IsSet)
        {
            try
            {
                if (_firstConnection.Wait(HandOverTick, _stop.Token))
                {
                    break;
                }
            }
            catch (OperationCanceledException)
            {
                return false;
            }

            if (KernelHungUp("before the relay had a server connection"))
            {
                return false;
            }
        }

        return !_stop.IsCancellationRequested;
    }

    /// <summary>
    /// Receives more of the kernel's stream into the ring; when it holds as many unanswered bytes as it can, waits for
    /// a reply to free some instead (the driver's sends then wait in the socket). False once the relay ended.
    /// </summary>
    private bool Receive()
    {
        int room;
        lock (_lock)
        {
            room = _ring.Room(_tail);
            if (room == 0)
            {
                _room.Reset();
            }
        }

        if (room == 0)
        {
            return WaitForRoom();
        }

        if (_ring.Receive(_kernel, room) > 0)
        {
            // Nothing else reads our end: the count is exact here, between two receives.
            if (_journal is not null && _ring.Head - _journal.OurCounter.Base > _journal.RearmAfter)
            {
                _journal.OurCounter.Arm(_kernel, _ring.Head);
            }

            return true;
        }

        End(_ring.Unparsed == 0
            ? new NbdRelayEnd(NbdRelayEndReason.KernelClosed, "the kernel closed its end")
            : new NbdRelayEnd(NbdRelayEndReason.KernelClosed, "the kernel's end failed: connection ended inside a message", new EndOfStreamException("connection ended inside a message")));
        return false;
    }

    /// <summary>
    /// The ring is full: waits for a release (true) or the end of the relay (false). Meanwhile nothing is read from the
    /// kernel's end, so its hang-up is looked for here: a disconnect shuts the driver's end down (netlink at once, ioctl
    /// at NBD_CLEAR_SOCK), and a relay waiting on a server that answers nothing would otherwise never see it.
    /// </summary>
    private bool WaitForRoom()
    {
        while (true)
        {
            // End cancels, then sets _room: an End whose set came before the reset in Receive is seen here.
            if (_stop.IsCancellationRequested)
            {
                return false;
            }

            if (_room.Wait(HandOverTick))
            {
                return true;
            }

            if (KernelHungUp("the relay held as many unanswered requests as it can"))
            {
                return false;
            }
        }
    }

    /// <summary>
    /// While the kernel thread reads nothing: whether the driver's end hung up (then the relay ends KernelClosed, the
    /// reason naming <paramref name="while"/>). A send of nothing fails with EPIPE once the peer shut its end down or
    /// closed it, and adds nothing to the stream (unix_stream_sendmsg checks SEND_SHUTDOWN before its copy loop);
    /// unread requests do not hide it, as they would from poll(2)'s readability.
    /// </summary>
    private bool KernelHungUp(string @while)
    {
        try
        {
            _kernel.Send(ReadOnlySpan<byte>.Empty);
            return false;
        }
        catch (SocketException)
        {
            End(new NbdRelayEnd(NbdRelayEndReason.KernelClosed, "the kernel closed its end (" + @while + ")"));
            return true;
        }
    }

    /// <summary>One whole request from the ring: kept until answered, and sent on. False when the relay ends with it.</summary>
    private bool Carry(NbdRequestHeader request, RingSlice bytes)
    {
        if (request.Type == NbdCommand.Disconnect)
        {
            var header = new byte[NbdTransmission.RequestLength];
            bytes.CopyTo(header);
            Disconnect(header);
            return false;
        }

        var pending = new Pending(request, bytes, Interlocked.Increment(ref _sequence));
        lock (_lock)
        {
            if (!_pending.TryAdd(request.Cookie, pending))
            {
                End(new NbdRelayEnd(NbdRelayEndReason.KernelProtocolError, string.Create(CultureInfo.InvariantCulture, $"the kernel reused cookie 0x{request.Cookie:x16} of a request still in flight")));
                return false;
            }

            _order.Enqueue(pending);
        }

        Send(pending);
        return true;
    }

    /// <summary>
    /// Frees the ring up to the oldest request that is not yet answered or is being sent right now (a send reads the
    /// ring: a misbehaving server may answer a write before it has all of its data). Under _lock.
    /// </summary>
    private void ReleaseAnswered()
    {
        bool moved = false;
        while (_order.TryPeek(out Pending? oldest) && oldest.Delivered && !oldest.Sending)
        {
            _order.Dequeue();
            _tail = oldest.Bytes.End;
            moved = true;
            if (_journal is not null)
            {
                // The tail first: a kill between the two leaves a mark behind the tail, which recovery ignores; the
                // other order would leave a delivered request unmarked, and its reply would go to the kernel twice.
                _journal.Tail = _tail;
                _journal.ClearDelivered(oldest.Bytes.Start);
            }
        }

        if (moved)
        {
            _room.Set();
        }
    }

    /// <summary>
    /// Between two requests with nothing buffered: waits until the kernel's end is readable (true), or stops reading for
    /// a hand-over or the end of the relay (false; a hand-over is told the stream is at a boundary). A hand-over stops
    /// only once the socket held nothing unread at some moment after it was asked for: a request the kernel sent before
    /// (with the deadline it had then) is carried and answered, never left waiting for the next process.
    /// </summary>
    private bool WaitForRequest()
    {
        while (!_stop.IsCancellationRequested)
        {
            bool handingOver = _handingOver;
            if (_kernel.Poll(handingOver ? TimeSpan.Zero : HandOverTick, SelectMode.SelectRead))
            {
                return true;
            }

            if (handingOver)
            {
                _kernelQuiet.Set();
                return false;
            }
        }

        return false;
    }

    /// <summary>A request's bytes on the wire: its header, and a write's data.</summary>
    private static int WireLength(NbdRequestHeader request) =>
        NbdTransmission.RequestLength + (request.Type == NbdCommand.Write ? (int)request.Length : 0);

    /// <summary>Everything the relay cannot carry faithfully, checked before any buffer is allocated.</summary>
    private static string? Refuse(NbdRequestHeader request)
    {
        if (request.Magic != NbdTransmission.RequestMagic)
        {
            return string.Create(CultureInfo.InvariantCulture, $"request magic 0x{request.Magic:x8} is not 0x{NbdTransmission.RequestMagic:x8}");
        }

        if (request.Type is not (NbdCommand.Read or NbdCommand.Write or NbdCommand.Disconnect or NbdCommand.Flush or NbdCommand.Trim or NbdCommand.Cache or NbdCommand.WriteZeroes))
        {
            // BLOCK_STATUS needs structured replies, RESIZE is an extension: the driver sends neither.
            return string.Create(CultureInfo.InvariantCulture, $"request type {(ushort)request.Type} is not one the relay carries");
        }

        if (request.Type is NbdCommand.Read or NbdCommand.Write && request.Length > NbdTransmission.MaxDataLength)
        {
            return string.Create(CultureInfo.InvariantCulture, $"request length {request.Length} exceeds the driver's largest ({NbdTransmission.MaxDataLength})");
        }

        return null;
    }

    /// <summary>Sends a request on the current connection unless it went out there already (a resend beat us to it).</summary>
    private void Send(Pending pending)
    {
        lock (_sendLock)
        {
            Socket? server;
            int generation;
            lock (_lock)
            {
                server = _server;
                generation = _generation;
            }

            // No connection: the reconnect sends every pending request once it has one.
            if (server is null || pending.SentGeneration == generation)
            {
                return;
            }

            try
            {
                SendFromRing(server, pending, generation);
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                // The server thread owns reconnecting; waking its blocked recv is enough.
                TryShutdown(server);
            }
        }
    }

    /// <summary>
    /// Sends <paramref name="pending"/>'s bytes from the ring, unless it was answered meanwhile (a resend on an earlier
    /// connection got its reply, or a server answered what it had not read yet: its bytes may be released). They stay
    /// in the ring while the send runs; once it ends, they go if the reply came meanwhile. Under the send lock.
    /// </summary>
    private void SendFromRing(Socket server, Pending pending, int generation)
    {
        lock (_lock)
        {
            if (pending.Answered)
            {
                return;
            }

            pending.Sending = true;
        }

        try
        {
            SendAll(server, pending.Bytes);
            pending.SentGeneration = generation;
        }
        finally
        {
            lock (_lock)
            {
                pending.Sending = false;
                ReleaseAnswered();
            }
        }
    }

    /// <summary>
    /// NBD_CMD_DISC from the kernel. The spec has the server answer every outstanding request before it closes, and the
    /// driver goes on reading replies after it sent DISC: so the relay passes DISC on, reads no further request, and
    /// ends once the replies still owed went back to the kernel (or the server closed). During an outage there is no
    /// server to tell and nothing will answer: it ends at once.
    /// </summary>
    private void Disconnect(byte[] header)
    {
        // A server that neither answers nor closes gets GiveUpAfter, as a reconnect would (the driver may have no timeout
        // of its own: ioctl 0). Armed before DISC goes out, so that whoever sees DISC arrive knows the clock is running.
        // GiveUpAfter zero means no reconnect, not "no wait": the replies owed still come on this connection.
        TimeSpan limit = _options.GiveUpAfter == TimeSpan.Zero ? DisconnectWaitWithoutReconnect
            : _options.GiveUpAfter <= LongestTimer ? _options.GiveUpAfter : Timeout.InfiniteTimeSpan;
        ITimer deadline = _options.TimeProvider.CreateTimer(_ => EndAfterDisconnect(), null, limit, Timeout.InfiniteTimeSpan);
        lock (_lock)
        {
            _disconnectDeadline = deadline;
        }

        bool passedOn = false;
        lock (_sendLock)
        {
            Socket? server;
            lock (_lock)
            {
                _disconnecting = true;
                server = _server;
            }

            if (server is not null)
            {
                try
                {
                    SendAll(server, header, default);
                    passedOn = true;
                }
                catch (Exception e) when (e is SocketException or ObjectDisposedException)
                {
                    // The server is gone: it needs no goodbye, and will answer nothing more.
                }
            }
        }

        // Nothing owed, or no server left to answer: end now. Otherwise the server thread ends the relay with the last
        // reply it delivers or when the server closes, or the deadline does.
        if (!passedOn || Owed() == 0)
        {
            EndAfterDisconnect();
        }
    }

    /// <summary>Replies the kernel is still owed: requests in flight and replies on their way to it.</summary>
    private int Owed()
    {
        lock (_lock)
        {
            return _pending.Count + _delivering;
        }
    }

    /// <summary>Every way the relay ends after DISC: all replies went back, the server closed, or the deadline passed.</summary>
    private void EndAfterDisconnect()
    {
        int owed = Owed();
        End(new NbdRelayEnd(
            NbdRelayEndReason.Disconnected,
            owed == 0 ? "the kernel sent NBD_CMD_DISC"
                : string.Create(CultureInfo.InvariantCulture, $"the kernel sent NBD_CMD_DISC; {owed} requests in flight then got no reply")));
    }

    private void ServerLoop()
    {
        var header = new byte[NbdTransmission.SimpleReplyLength];
        Socket? server;
        lock (_lock)
        {
            server = _server;
        }

        // Start of the outage the current connection ended, if it came from a reconnect.
        long? outageSince = null;
        if (_startWithResend)
        {
            // A journaled relay: what was pending when it started (recovered, or nothing) goes out first.
            if (_firstServer is null)
            {
                (server, outageSince) = ReconnectAndResend(null);
            }
            else if (Resend(_firstServer) is null)
            {
                return;
            }
            else
            {
                server = _firstServer;
            }
        }

        long connectedAt = _options.TimeProvider.GetTimestamp();
        while (server is not null && !_stop.IsCancellationRequested)
        {
            string reason;
            Exception? failure = null;
            bool shuttingDown = false;
            int answered = 0;
            try
            {
                var reader = new BlockingSocketReader(server);
                while (ForwardReply(reader, header))
                {
                    answered++;
                }

                reason = "the server closed the connection";
            }
            catch (RelayServerException e)
            {
                reason = e.Message;
                failure = e;
                shuttingDown = e is ServerShuttingDownException;
            }
            catch (Exception e) when (e is SocketException or EndOfStreamException or ObjectDisposedException)
            {
                reason = e is EndOfStreamException ? "the server connection ended inside a reply" : "server connection failed: " + e.Message;
                failure = e;
            }
            catch (KernelSideException e)
            {
                End(new NbdRelayEnd(NbdRelayEndReason.KernelClosed, "the kernel's end failed: " + e.InnerException?.Message, e.InnerException));
                return;
            }

            if (_stop.IsCancellationRequested)
            {
                return;
            }

            int inFlight;
            bool disconnecting;
            lock (_lock)
            {
                _server = null;
                inFlight = _pending.Count;
                disconnecting = _disconnecting;
            }

            if (disconnecting)
            {
                // After DISC the server closing is the orderly end, not a loss to hide.
                EndAfterDisconnect();
                return;
            }

            if (shuttingDown)
            {
                SendSoftDisconnect(server);
            }

            TryShutdown(server);
            lock (_sendLock)
            {
                // No send can be inside this socket now: closing it is safe.
                server.Dispose();
            }

            Raise(new NbdRelayServerLost(reason, inFlight, failure));

            // A connection that took over and died with requests waiting, none answered, ended no outage (a request
            // that kills the server, a server that drops every connection): the give-up clock runs on, and the next
            // attempt waits RetryInterval instead of spinning. So did one that died at once with nothing to answer (a
            // server that closes every connection after the handshake, an idle device): else connect and handshake
            // would follow each other without a pause, for ever, each a warning in the journal.
            bool quickDrop = _options.TimeProvider.GetElapsedTime(connectedAt) < QuickDrop;
            bool stillDown = outageSince is not null && answered == 0 && (inFlight > 0 || quickDrop);
            (server, outageSince) = ReconnectAndResend(stillDown ? outageSince : null);
            connectedAt = _options.TimeProvider.GetTimestamp();
        }
    }

    /// <summary>
    /// The soft disconnect proto.md asks for after NBD_ESHUTDOWN: an NBD_CMD_DISC between two requests (the send lock,
    /// not waited for long: a resend may be busy on this connection), sent without blocking, so a server that stopped
    /// reading gets none. The requests it still owes replies for are sent again on the next connection either way.
    /// </summary>
    private void SendSoftDisconnect(Socket server)
    {
        if (!_sendLock.TryEnter(TimeSpan.FromMilliseconds(500)))
        {
            return;
        }

        try
        {
            Span<byte> disc = stackalloc byte[NbdTransmission.RequestLength];
            NbdTransmission.WriteRequest(disc, NbdCommand.Disconnect, cookie: 0);
            server.Blocking = false;
            server.Send(disc);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            // Gone already: the close that follows is all there is to do.
        }
        finally
        {
            _sendLock.Exit();
        }
    }

    /// <summary>One reply from the server to the kernel; false on an orderly end of the server connection.</summary>
    private bool ForwardReply(BlockingSocketReader reader, byte[] header)
    {
        if (!reader.TryReadExactly(header))
        {
            return false;
        }

        NbdSimpleReplyHeader reply = NbdTransmission.ReadReply(header);
        if (reply.Magic != NbdTransmission.SimpleReplyMagic)
        {
            throw new RelayServerException(string.Create(
                CultureInfo.InvariantCulture,
                $"server sent reply magic 0x{reply.Magic:x8}{(reply.Magic == NbdTransmission.StructuredReplyMagic ? " (a structured reply, never negotiated)" : "")}, not 0x{NbdTransmission.SimpleReplyMagic:x8}"));
        }

        Pending? pending;
        bool disconnecting;
        lock (_lock)
        {
            _pending.TryGetValue(reply.Cookie, out pending);
            disconnecting = _disconnecting;
        }

        if (pending is null)
        {
            throw new RelayServerException(string.Create(CultureInfo.InvariantCulture, $"server replied to cookie 0x{reply.Cookie:x16}, which no request in flight has"));
        }

        // NBD_ESHUTDOWN: the server did not carry the request out and is going away (nbdkit answers so to what it read
        // after SIGTERM). Passed on, the kernel would fail the I/O; instead the request stays pending for the next
        // connection, like one in flight on a connection that died. After the kernel's own DISC it goes through as it is.
        if (reply.Error == NbdTransmission.ErrorShutdown && !disconnecting)
        {
            throw new ServerShuttingDownException(string.Create(CultureInfo.InvariantCulture, $"the server is shutting down: NBD_ESHUTDOWN for cookie 0x{reply.Cookie:x16}"));
        }

        // The length of a read reply's data is the request's, never the server's word: nothing to bound here.
        int length = pending.Request.Type == NbdCommand.Read && reply.Error == 0 ? (int)pending.Request.Length : 0;
        byte[]? data = null;
        if (_journal is not null)
        {
            // Kept where a successor finds it, should the send to the kernel be cut.
            Span<byte> kept = _journal.ReplyBuffer(header.Length + length);
            header.CopyTo(kept);
            reader.ReadExactly(kept[header.Length..]);
        }
        else if (length > 0)
        {
            data = ArrayPool<byte>.Shared.Rent(length);
            try
            {
                reader.ReadExactly(data.AsSpan(0, length));
            }
            catch
            {
                ArrayPool<byte>.Shared.Return(data);
                throw;
            }
        }

        lock (_lock)
        {
            _pending.Remove(reply.Cookie);
            pending.Answered = true;
            _delivering++;
        }

        bool lastAfterDisconnect;
        bool whole = false;
        try
        {
            if (_journal is not null)
            {
                SendJournaled(pending, reply.Cookie, header.Length + length);
            }
            else
            {
                SendAll(_kernel, header, data.AsSpan(0, length));
            }

            whole = true;
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            throw new KernelSideException(e);
        }
        finally
        {
            if (data is not null)
            {
                ArrayPool<byte>.Shared.Return(data);
            }

            lock (_lock)
            {
                pending.Delivered = true;
                if (whole)
                {
                    _journal?.MarkDelivered(pending.Bytes.Start);
                }

                ReleaseAnswered();
                _delivering--;
                lastAfterDisconnect = _disconnecting && _pending.Count == 0 && _delivering == 0;
            }
        }

        if (lastAfterDisconnect)
        {
            EndAfterDisconnect();
            return false;
        }

        return true;
    }

    /// <summary>
    /// Sends the reply kept in the journal's buffer to the kernel, recorded first: a successor after a kill learns from
    /// the driver's end's counter how much of it went out, and sends the rest from the buffer.
    /// </summary>
    private void SendJournaled(Pending pending, ulong cookie, int length)
    {
        RelayJournal journal = _journal!;
        RelayJournal.StreamCounter counter = journal.DriverCounter;

        // Armed again only while the driver has read everything: nobody else sends there, so once a recv that took the
        // last bytes has also lowered the counter (SettleReaders: since 6.8 setsockopt no longer waits for it), nothing
        // moves it. Under a steady load that moment is rare right after a send: past half the counter's spare range,
        // wait for it a little (5 ms) on every reply.
        long spent = _replied - counter.Base;
        if (spent > journal.RearmAfter && DriverDrained(spent > journal.RearmAfter * 3 / 2 ? TimeSpan.FromMilliseconds(5) : TimeSpan.Zero))
        {
            RelayJournal.SettleReaders(_driverSide!);
            counter.Arm(_driverSide!, _replied);
        }

        if (_replied + length - counter.Base >= RelayJournal.ArmedValue)
        {
            AbandonJournal("the driver's end never had everything read while 1 GiB of replies went out, so its counter could not be armed again");
        }

        journal.Publish(new ReplyRecord(pending.Bytes.Start, cookie, _replied, length));
        SendAll(_kernel, journal.ReplyBuffer(length));
        _replied += length;
    }

    /// <summary>Whether the driver's end has nothing unread within <paramref name="limit"/> (short limits spin, long ones sleep 1 ms).</summary>
    private bool DriverDrained(TimeSpan limit)
    {
        long since = Stopwatch.GetTimestamp();
        while (_driverSide!.Available > 0)
        {
            if (Stopwatch.GetElapsedTime(since) >= limit)
            {
                return false;
            }

            Thread.Sleep(limit > TimeSpan.FromMilliseconds(50) ? 1 : 0);
        }

        return true;
    }

    /// <summary>A successor can no longer recover from the journal: told once, by the journal's state and an event.</summary>
    private void AbandonJournal(string reason)
    {
        if (_journal is null || _journal.State == JournalState.Abandoned)
        {
            return;
        }

        _journal.State = JournalState.Abandoned;
        Raise(new NbdRelayJournalAbandoned(reason));
    }

    /// <summary>
    /// Takes up where a killed predecessor stopped, before any thread runs: how far each stream got comes from the two
    /// sockets' counters; a reply the kill cut off is finished from the journal's buffer; the requests in the ring not
    /// yet answered become pending again (the server thread sends them first), those whose reply went out stay until
    /// the tail passes them; a request not yet received whole is left for the kernel thread to finish.
    /// </summary>
    private void Recover()
    {
        RelayJournal journal = _journal!;

        // Nobody reads our end now: a flip that was due (a kill inside an arm) is made before anything relies on Base.
        journal.OurCounter.CompleteFlip(_kernel);
        long head = journal.OurCounter.Position(_kernel);
        long tail = journal.Tail;
        if (head < tail || head - tail > journal.RingCapacity)
        {
            throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the relay journal's ring tail {tail} does not fit the {head} request bytes consumed from our end (ring of {journal.RingCapacity} bytes)"));
        }

        long sent = DriverConsumed();
        ReplyRecord last = journal.Published;
        if (last.ReplyStart < 0 || !(last.Length == 0 || (last.Length >= NbdTransmission.SimpleReplyLength && last.Length <= journal.ReplyCapacity)))
        {
            throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the relay journal's last reply record is malformed (start {last.ReplyStart}, length {last.Length})"));
        }

        if (sent < last.ReplyStart || sent > last.ReplyStart + last.Length)
        {
            throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the driver read {sent} reply bytes, but the last reply the relay journal recorded spans [{last.ReplyStart}, {last.ReplyStart + last.Length})"));
        }

        _ring.Restore(head, tail);
        var delivered = new List<long>();
        Span<byte> header = stackalloc byte[NbdTransmission.RequestLength];
        while (_ring.Unparsed >= header.Length)
        {
            _ring.Peek(header);
            NbdRequestHeader request = NbdTransmission.ReadRequest(header);
            if (Refuse(request) is string why)
            {
                throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the relay journal's ring holds no request at stream position {_ring.Parsed}: {why}"));
            }

            int length = WireLength(request);
            if (request.Type == NbdCommand.Disconnect || _ring.Unparsed < length)
            {
                // The kernel thread carries it on as it comes.
                break;
            }

            RingSlice bytes = _ring.Take(length);
            var pending = new Pending(request, bytes, ++_sequence);
            if (last.Length > 0 && bytes.Start == last.RequestStart && request.Cookie != last.Cookie)
            {
                throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the reply the relay journal recorded last is for cookie 0x{last.Cookie:x16}, but the request at stream position {bytes.Start} has cookie 0x{request.Cookie:x16}"));
            }

            if (journal.IsDelivered(bytes.Start) || (last.Length > 0 && bytes.Start == last.RequestStart))
            {
                pending.Answered = true;
                pending.Delivered = true;
                delivered.Add(bytes.Start);
            }
            else if (!_pending.TryAdd(request.Cookie, pending))
            {
                throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the relay journal's ring holds two unanswered requests with cookie 0x{request.Cookie:x16}"));
            }

            _order.Enqueue(pending);
        }

        if (last.Length > 0 && last.RequestStart >= tail && !delivered.Contains(last.RequestStart))
        {
            throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the reply the relay journal recorded last answers a request at stream position {last.RequestStart}, which its ring does not hold"));
        }

        long cut = last.ReplyStart + last.Length - sent;
        if (cut > 0)
        {
            NbdSimpleReplyHeader kept = NbdTransmission.ReadReply(journal.ReplyBuffer(NbdTransmission.SimpleReplyLength));
            if (kept.Magic != NbdTransmission.SimpleReplyMagic || kept.Cookie != last.Cookie)
            {
                throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the relay journal's reply buffer holds no reply to cookie 0x{last.Cookie:x16} (magic 0x{kept.Magic:x8}, cookie 0x{kept.Cookie:x16})"));
            }

            // Everything checked: only now does a byte go to the kernel. A driver that stopped reading gets 10 s.
            _kernel.SendTimeout = 10_000;
            try
            {
                SendAll(_kernel, journal.ReplyBuffer((int)last.Length)[(int)(sent - last.ReplyStart)..]);
            }
            finally
            {
                _kernel.SendTimeout = 0;
            }
        }

        Recovered = new RelayRecovery(head, tail, _ring.Parsed, sent, cut, last.Length, _pending.Count, delivered.Count);

        _replied = last.ReplyStart + last.Length;

        // Never a live mark cleared (a kill here must leave a journal the next successor recovers from just as well): a
        // mark a kill left behind the tail lies where the ring holds no whole request.
        journal.ClearDelivered(_ring.Parsed, tail + journal.RingCapacity);
        foreach (long start in delivered)
        {
            journal.MarkDelivered(start);
        }

        _tail = tail;
        ReleaseAnswered();
    }

    /// <summary>
    /// The reply bytes the driver consumed: once it has read all that was sent to its end (it reads as long as it
    /// waits for replies), its counter stops moving. A peek that finds nothing takes the socket's reader lock, so a
    /// recv that took the last bytes has also lowered the counter by then.
    /// </summary>
    private long DriverConsumed()
    {
        Socket driver = _driverSide!;
        if (!DriverDrained(TimeSpan.FromSeconds(5)))
        {
            throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the driver did not read the {driver.Available} reply bytes waiting at its end within 5 s"));
        }

        RelayJournal.SettleReaders(driver);
        _journal!.DriverCounter.CompleteFlip(driver);
        return _journal.DriverCounter.Position(driver);
    }

    /// <summary>
    /// Opens a new server connection (at once, then every RetryInterval), makes it current and sends every unanswered
    /// request on it in the kernel's order. Null when the relay ended meanwhile or gave up; with the connection, the
    /// start of the outage (<paramref name="outageSince"/>: an outage that goes on, first attempt after a pause).
    /// </summary>
    private (Socket? Server, long? OutageSince) ReconnectAndResend(long? outageSince)
    {
        TimeProvider time = _options.TimeProvider;
        long downSince = outageSince ?? time.GetTimestamp();
        int attempt = 0;
        bool pause = outageSince is not null;
        while (!_stop.IsCancellationRequested)
        {
            // Checked again after every pause: no attempt starts once GiveUpAfter has passed, and none may run past it.
            TimeSpan left = _options.GiveUpAfter - time.GetElapsedTime(downSince);
            if (left > TimeSpan.Zero && pause)
            {
                pause = false;
                bool toTheEnd = _options.RetryInterval >= left;
                if (!Pause(toTheEnd ? left : _options.RetryInterval))
                {
                    return (null, null);
                }

                // A pause that ran to the deadline ends the trying, even if the timer fired a tick before the clock.
                if (!toTheEnd)
                {
                    continue;
                }

                left = TimeSpan.Zero;
            }

            if (left <= TimeSpan.Zero)
            {
                End(new NbdRelayEnd(NbdRelayEndReason.GaveUp, string.Create(CultureInfo.InvariantCulture, $"no server connection that answered within {_options.GiveUpAfter.TotalSeconds:0.###} s ({attempt} attempts since the last loss)")));
                return (null, null);
            }

            attempt++;
            Socket server;
            try
            {
                // The attempt's deadline runs on the injected clock like everything else here; beyond a timer's range
                // there is none (the loop checks the clock again after the attempt).
                using var giveUp = new CancellationTokenSource(left <= LongestTimer ? left : Timeout.InfiniteTimeSpan, time);
                using var deadline = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token, giveUp.Token);
                server = _options.Reconnect(deadline.Token).GetAwaiter().GetResult();
            }
            catch (Exception e) when (!_stop.IsCancellationRequested)
            {
                if (_options.IsPermanent?.Invoke(e) == true)
                {
                    End(new NbdRelayEnd(NbdRelayEndReason.GaveUp, "reconnect refused: " + e.Message, e));
                    return (null, null);
                }

                Raise(new NbdRelayReconnectFailed(attempt, e));
                pause = true;
                continue;
            }
            catch (Exception)
            {
                return (null, null);
            }

            if (Resend(server) is not int resent)
            {
                return (null, null);
            }

            Interlocked.Increment(ref _reconnects);
            Raise(new NbdRelayReconnected(time.GetElapsedTime(downSince), attempt, resent));
            return (server, downSince);
        }

        return (null, null);
    }

    /// <summary>
    /// Makes <paramref name="server"/> current and has the unanswered requests sent on it by a thread of their own;
    /// returns how many once they are fixed (null: the relay ended). Only this thread reads replies, and it must be
    /// reading while the resend goes on: a server that answers in order stops reading requests while its replies are
    /// not read, so a backlog of reads ahead of write data would otherwise stall both sides for good.
    /// </summary>
    private int? Resend(Socket server)
    {
        // The previous resend ended with its connection (its lock was taken before this connection was dropped).
        _resender?.Join();
        var fixedCount = new TaskCompletionSource<int?>(TaskCreationOptions.RunContinuationsAsynchronously);
        _resender = new Thread(() => Guarded(() => ResendLoop(server, fixedCount))) { IsBackground = true, Name = _options.Name + " r" };
        _resender.Start();
        return fixedCount.Task.GetAwaiter().GetResult();
    }

    private void ResendLoop(Socket server, TaskCompletionSource<int?> fixedCount)
    {
        // Holding the send lock throughout keeps the kernel thread's new requests behind the resent ones.
        lock (_sendLock)
        {
            List<Pending> unanswered;
            int generation;
            lock (_lock)
            {
                if (_stop.IsCancellationRequested)
                {
                    server.Dispose();
                    fixedCount.SetResult(null);
                    return;
                }

                generation = ++_generation;
                _server = server;
                _lastServer = server;
                _firstConnection.Set();
                unanswered = [.. _pending.Values.OrderBy(p => p.Sequence)];
            }

            fixedCount.SetResult(unanswered.Count);
            try
            {
                foreach (Pending pending in unanswered)
                {
                    SendFromRing(server, pending, generation);
                }
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                // As for any failed send: the server thread notices the dead connection and reconnects.
                TryShutdown(server);
            }
        }
    }

    /// <summary>Waits <paramref name="delay"/>; false when the relay ended meanwhile.</summary>
    private bool Pause(TimeSpan delay)
    {
        try
        {
            Task.Delay(delay, _options.TimeProvider, _stop.Token).GetAwaiter().GetResult();
            return true;
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    /// <summary>
    /// First end wins: record it, then wake both threads by shutting both connections down (the kernel's end stays open
    /// for a hand-over: its thread has stopped reading already).
    /// </summary>
    private void End(NbdRelayEnd end, bool shutDownKernelSide = true)
    {
        if (!_ended.TrySetResult(end))
        {
            return;
        }

        try
        {
            _stop.Cancel();
            _room.Set();
        }
        catch (ObjectDisposedException)
        {
        }

        // Read after the cancel: a resend that makes a connection current checks the cancel under the same lock, so
        // either it sees the cancel or this sees its connection.
        Socket? server;
        lock (_lock)
        {
            server = _server;
        }

        bool shutDown;
        lock (_endLock)
        {
            shutDown = shutDownKernelSide && !_kernelSideKept;
        }

        if (shutDown)
        {
            TryShutdown(_kernel);
        }

        if (server is not null)
        {
            TryShutdown(server);
        }
    }

    private void Raise(NbdRelayEvent relayEvent)
    {
        try
        {
            _options.Events?.Invoke(relayEvent);
        }
#pragma warning disable CA1031 // A faulty log callback must not end the data path.
        catch (Exception)
#pragma warning restore CA1031
        {
        }
    }

    private static void SendAll(Socket socket, ReadOnlySpan<byte> header, ReadOnlySpan<byte> data)
    {
        if (data.IsEmpty || data.Length > 64 * 1024)
        {
            SendAll(socket, header);
            SendAll(socket, data);
            return;
        }

        // Small payloads go out with their header in one send: one segment for the peer to wake up for.
        byte[] joined = ArrayPool<byte>.Shared.Rent(header.Length + data.Length);
        try
        {
            header.CopyTo(joined);
            data.CopyTo(joined.AsSpan(header.Length));
            SendAll(socket, joined.AsSpan(0, header.Length + data.Length));
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(joined);
        }
    }

    private static void SendAll(Socket socket, RingSlice bytes)
    {
        SendAll(socket, bytes.First);
        SendAll(socket, bytes.Second);
    }

    private static void SendAll(Socket socket, ReadOnlySpan<byte> bytes)
    {
        while (!bytes.IsEmpty)
        {
            bytes = bytes[socket.Send(bytes)..];
        }
    }

    private static void TryShutdown(Socket socket)
    {
        try
        {
            socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            // Not connected any more: whoever was blocked on it has been woken already.
        }
    }

    /// <summary>One request from the kernel: its bytes stay in the ring until its reply went back.</summary>
    private sealed class Pending(NbdRequestHeader request, RingSlice bytes, long sequence)
    {
        public NbdRequestHeader Request { get; } = request;

        /// <summary>The request as the kernel sent it, header and write data.</summary>
        public RingSlice Bytes { get; } = bytes;

        public long Sequence { get; } = sequence;

        /// <summary>A reply for it was read from the server (set under the relay's lock).</summary>
        public bool Answered { get; set; }

        /// <summary>That reply went to the kernel (under the relay's lock).</summary>
        public bool Delivered { get; set; }

        /// <summary>A send of its bytes is running (under the relay's lock): they stay in the ring until it ends.</summary>
        public bool Sending { get; set; }

        /// <summary>The connection generation it was last sent on; -1 = never sent.</summary>
        public int SentGeneration { get; set; } = -1;
    }

    private class RelayServerException(string message) : Exception(message);

    private sealed class ServerShuttingDownException(string message) : RelayServerException(message);

    private sealed class KernelSideException(Exception inner) : Exception(inner.Message, inner);
}

/// <summary>
/// A recovery from a killed relay's journal: request bytes consumed (<paramref name="Head"/>), the ring's tail, where the
/// first request not received whole starts (<paramref name="Parsed"/>), reply bytes the driver had read
/// (<paramref name="Sent"/>), the bytes of a cut reply sent from the journal (<paramref name="Finished"/>; the last
/// reply recorded was <paramref name="LastReplyLength"/> long), and the requests found unanswered and answered in the ring.
/// </summary>
internal sealed record RelayRecovery(long Head, long Tail, long Parsed, long Sent, long Finished, long LastReplyLength, int Pending, int Delivered);

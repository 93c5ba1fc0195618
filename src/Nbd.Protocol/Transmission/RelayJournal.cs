using System.Buffers;
using System.Buffers.Binary;
using System.Globalization;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Nbd.Protocol.Transmission;

/// <summary>
/// What a relay must leave behind for a successor after its own SIGKILL, in a memfd mapped shared (its pages belong to
/// the file, not to the process, so every store is there the moment it is made): the ring the kernel's requests are
/// received into, where the ring's oldest unreleased request starts, which requests in it had their reply delivered,
/// the reply being sent to the kernel (its bytes and where it starts in the reply stream), and the bases of the two
/// stream counters (SO_PEEK_OFF) on our end of the pair and on the driver's. The descriptors it needs survive the
/// process elsewhere (systemd's file descriptor store; in the tests, the test process).
/// </summary>
/// <remarks>
/// Layout, all little-endian: a 4 KiB header, the delivered bitmap (one bit per ring byte: a request's bit is the
/// one of its first byte), the ring, the reply buffer (a reply header and the largest read, sparse until touched).
/// Every record a successor relies on is published by one aligned 4-byte store of an index into two slots, written
/// after the slot: a kill between two stores never leaves a record half-written.
/// </remarks>
internal sealed unsafe partial class RelayJournal : IDisposable
{
    /// <summary>Where a stream counter starts: it counts down from here, and is re-armed long before it reaches 0.</summary>
    public const int ArmedValue = int.MaxValue;

    /// <summary>By default, consumed since the last arm beyond which a counter is armed again (half its range).</summary>
    public const long DefaultRearmAfter = 1L << 30;

    private const ulong Magic = 0x314C4E524A44424E; // "NBDJRNL1"
    private const int Version = 1;
    private const int HeaderBytes = 4096;

    private const int MagicAt = 0;
    private const int VersionAt = 8;
    private const int StateAt = 12;
    private const int RingCapacityAt = 16;
    private const int ReplyCapacityAt = 24;
    private const int TailAt = 32;
    private const int RearmAfterAt = 40;
    private const int OurCounterAt = 64;
    private const int DriverCounterAt = 128;
    private const int RecordsAt = 192;
    private const int RecordBytes = 32;
    private const int RecordIndexAt = RecordsAt + (2 * RecordBytes);

    private readonly byte* _base;
    private readonly long _length;
    private readonly int _bitmapAt;
    private readonly int _ringAt;
    private readonly long _replyAt;
    private readonly MappedMemory _ringMemory;
    private int _disposed;

    private RelayJournal(SafeFileHandle file, byte* mapped, long length, int ringCapacity, int replyCapacity)
    {
        File = file;
        _base = mapped;
        _length = length;
        RingCapacity = ringCapacity;
        ReplyCapacity = replyCapacity;
        _bitmapAt = HeaderBytes;
        _ringAt = HeaderBytes + RoundUp(BitmapBytes(ringCapacity));
        _replyAt = _ringAt + (long)ringCapacity;
        _ringMemory = new MappedMemory(_base + _ringAt, ringCapacity);
        OurCounter = new StreamCounter(this, OurCounterAt);
        DriverCounter = new StreamCounter(this, DriverCounterAt);
    }

    /// <summary>The memfd: what a successor opens the journal from.</summary>
    public SafeFileHandle File { get; }

    public int RingCapacity { get; }

    /// <summary>The largest reply the buffer holds: a reply header and the driver's largest read.</summary>
    public int ReplyCapacity { get; }

    public JournalState State
    {
        get => (JournalState)Volatile.Read(ref *(int*)(_base + StateAt));
        set => Volatile.Write(ref *(int*)(_base + StateAt), (int)value);
    }

    /// <summary>The ring's bytes, for <see cref="RequestRing"/>: stream position p is at p mod <see cref="RingCapacity"/>.</summary>
    public Memory<byte> Ring => _ringMemory.Memory;

    /// <summary>Consumed since a counter's last arm beyond which it is armed again (tests make it small).</summary>
    public long RearmAfter => Volatile.Read(ref *(long*)(_base + RearmAfterAt));

    /// <summary>Where the oldest request not yet released starts (the relay's tail).</summary>
    public long Tail
    {
        get => Volatile.Read(ref *(long*)(_base + TailAt));
        set => Volatile.Write(ref *(long*)(_base + TailAt), value);
    }

    /// <summary>Counts the request bytes our end's reader consumed.</summary>
    public StreamCounter OurCounter { get; }

    /// <summary>Counts the reply bytes the driver consumed from its end.</summary>
    public StreamCounter DriverCounter { get; }

    /// <summary>Where the reply sent to the kernel is kept while it is sent: only ever one at a time.</summary>
    public Span<byte> ReplyBuffer(int length)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, ReplyCapacity);
        return new Span<byte>(_base + _replyAt, length);
    }

    /// <summary>
    /// A new, empty journal for a ring of <paramref name="ringCapacity"/> bytes, in a memfd of its own; its counters are
    /// armed again after <paramref name="rearmAfter"/> bytes (at most half their range).
    /// </summary>
    public static RelayJournal Create(int ringCapacity, long rearmAfter = DefaultRearmAfter)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(ringCapacity, NbdTransmission.RequestLength);
        ArgumentOutOfRangeException.ThrowIfLessThan(rearmAfter, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(rearmAfter, DefaultRearmAfter);
        int replyCapacity = NbdTransmission.SimpleReplyLength + NbdTransmission.MaxDataLength;
        long length = Size(ringCapacity, replyCapacity);
        int fd = MemfdCreate("nbd-relay-journal", MfdCloexec);
        if (fd < 0)
        {
            throw Failed("memfd_create");
        }

        var file = new SafeFileHandle(fd, ownsHandle: true);
        try
        {
            if (Ftruncate(fd, length) != 0)
            {
                throw Failed("ftruncate");
            }

            var journal = new RelayJournal(file, Map(fd, length), length, ringCapacity, replyCapacity);
            BinaryPrimitives.WriteUInt64LittleEndian(journal.Header(MagicAt, 8), Magic);
            BinaryPrimitives.WriteInt32LittleEndian(journal.Header(VersionAt, 4), Version);
            BinaryPrimitives.WriteInt64LittleEndian(journal.Header(RingCapacityAt, 8), ringCapacity);
            BinaryPrimitives.WriteInt64LittleEndian(journal.Header(ReplyCapacityAt, 8), replyCapacity);
            BinaryPrimitives.WriteInt64LittleEndian(journal.Header(RearmAfterAt, 8), rearmAfter);
            journal.State = JournalState.New;
            return journal;
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The journal in the memfd <paramref name="file"/> (which it now owns), as a predecessor left it; an
    /// <see cref="InvalidDataException"/> naming the problem when it is no journal of this version.
    /// </summary>
    public static RelayJournal Open(SafeFileHandle file)
    {
        ArgumentNullException.ThrowIfNull(file);
        try
        {
            return OpenOwned(file);
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    private static RelayJournal OpenOwned(SafeFileHandle file)
    {
        int fd = (int)file.DangerousGetHandle();
        long length = Lseek(fd, 0, SeekEnd);
        if (length < 0)
        {
            throw Failed("lseek");
        }

        if (length < HeaderBytes)
        {
            throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the relay journal is {length} bytes, less than its header"));
        }

        byte* mapped = Map(fd, HeaderBytes);
        ulong magic;
        int version;
        long ring;
        long reply;
        try
        {
            var header = new ReadOnlySpan<byte>(mapped, HeaderBytes);
            magic = BinaryPrimitives.ReadUInt64LittleEndian(header[MagicAt..]);
            version = BinaryPrimitives.ReadInt32LittleEndian(header[VersionAt..]);
            ring = BinaryPrimitives.ReadInt64LittleEndian(header[RingCapacityAt..]);
            reply = BinaryPrimitives.ReadInt64LittleEndian(header[ReplyCapacityAt..]);
        }
        finally
        {
            _ = Munmap(mapped, HeaderBytes);
        }

        if (magic != Magic)
        {
            throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the file is no relay journal (magic 0x{magic:x16})"));
        }

        if (version != Version)
        {
            throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the relay journal is version {version}; this build reads version {Version}"));
        }

        if (ring < NbdTransmission.RequestLength || ring > int.MaxValue / 2 || reply < NbdTransmission.SimpleReplyLength || reply > int.MaxValue
            || Size((int)ring, (int)reply) != length)
        {
            throw new InvalidDataException(string.Create(CultureInfo.InvariantCulture, $"the relay journal's sizes do not fit together (ring {ring}, reply buffer {reply}, file {length} bytes)"));
        }

        var journal = new RelayJournal(file, Map(fd, length), length, (int)ring, (int)reply);
        string? problem = !Enum.IsDefined(journal.State) ? string.Create(CultureInfo.InvariantCulture, $"the relay journal's state {(int)journal.State} is none this build knows")
            : journal.RearmAfter is < 1 or > DefaultRearmAfter ? string.Create(CultureInfo.InvariantCulture, $"the relay journal's re-arm distance {journal.RearmAfter} is out of range")
            : null;
        if (problem is not null)
        {
            _ = Munmap(journal._base, length);
            throw new InvalidDataException(problem);
        }

        return journal;
    }

    public bool IsDelivered(long position) => (Bitmap()[Bit(position) >> 3] & (1 << (Bit(position) & 7))) != 0;

    /// <summary>Records that the reply to the request starting at <paramref name="position"/> went back to the kernel.</summary>
    public void MarkDelivered(long position)
    {
        int bit = Bit(position);
        ref byte cell = ref Bitmap()[bit >> 3];
        Volatile.Write(ref cell, (byte)(cell | (1 << (bit & 7))));
    }

    /// <summary>Forgets a released request's mark, before the ring's bytes at its position are received into again.</summary>
    public void ClearDelivered(long position)
    {
        int bit = Bit(position);
        ref byte cell = ref Bitmap()[bit >> 3];
        Volatile.Write(ref cell, (byte)(cell & ~(1 << (bit & 7))));
    }

    /// <summary>
    /// Clears the marks of stream positions [<paramref name="from"/>, <paramref name="to"/>), a range of the ring that
    /// holds no whole request (at most its size): a mark of a released request left behind by a kill can only lie there.
    /// </summary>
    public void ClearDelivered(long from, long to)
    {
        if (to < from || to - from > RingCapacity)
        {
            throw new ArgumentOutOfRangeException(nameof(to), "not a range within the ring");
        }

        // In ring offsets: one segment, or two where the range wraps. Whole bytes at once, the edges bit by bit: every
        // store clears only bits inside the range.
        int first = Bit(from);
        int length = (int)(to - from);
        int head = Math.Min(length, RingCapacity - first);
        ClearOffsets(first, head);
        ClearOffsets(0, length - head);
    }

    private void ClearOffsets(int offset, int count)
    {
        Span<byte> bitmap = Bitmap();
        int end = offset + count;
        int bit = offset;
        while (bit < end && (bit & 7) != 0)
        {
            ClearBit(bitmap, bit++);
        }

        int wholeEnd = end & ~7;
        if (bit < wholeEnd)
        {
            bitmap[(bit >> 3)..(wholeEnd >> 3)].Clear();
            bit = wholeEnd;
        }

        while (bit < end)
        {
            ClearBit(bitmap, bit++);
        }
    }

    private static void ClearBit(Span<byte> bitmap, int bit)
    {
        ref byte cell = ref bitmap[bit >> 3];
        Volatile.Write(ref cell, (byte)(cell & ~(1 << (bit & 7))));
    }

    /// <summary>
    /// Records, before its first byte goes to the kernel, the reply now in <see cref="ReplyBuffer"/>: the request it
    /// answers (its start in the request stream), its cookie, its start in the reply stream and its length.
    /// </summary>
    public void Publish(ReplyRecord record)
    {
        int next = 1 - (Volatile.Read(ref *(int*)(_base + RecordIndexAt)) & 1);
        Span<byte> slot = Header(RecordsAt + (next * RecordBytes), RecordBytes);
        BinaryPrimitives.WriteInt64LittleEndian(slot, record.RequestStart);
        BinaryPrimitives.WriteUInt64LittleEndian(slot[8..], record.Cookie);
        BinaryPrimitives.WriteInt64LittleEndian(slot[16..], record.ReplyStart);
        BinaryPrimitives.WriteInt64LittleEndian(slot[24..], record.Length);
        Volatile.Write(ref *(int*)(_base + RecordIndexAt), next);
    }

    /// <summary>The reply last published (all zero before the first).</summary>
    public ReplyRecord Published
    {
        get
        {
            int index = Volatile.Read(ref *(int*)(_base + RecordIndexAt));
            ReadOnlySpan<byte> slot = Header(RecordsAt + ((index & 1) * RecordBytes), RecordBytes);
            return new ReplyRecord(
                BinaryPrimitives.ReadInt64LittleEndian(slot),
                BinaryPrimitives.ReadUInt64LittleEndian(slot[8..]),
                BinaryPrimitives.ReadInt64LittleEndian(slot[16..]),
                BinaryPrimitives.ReadInt64LittleEndian(slot[24..]));
        }
    }

    /// <summary>Unmaps the journal and closes its memfd (whoever else holds a descriptor of it keeps it).</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        _ = Munmap(_base, _length);
        File.Dispose();
    }

    private static long Size(int ringCapacity, int replyCapacity) =>
        HeaderBytes + RoundUp(BitmapBytes(ringCapacity)) + (long)ringCapacity + RoundUp(replyCapacity);

    private static int BitmapBytes(int ringCapacity) => (ringCapacity + 7) / 8;

    private static int RoundUp(int bytes) => (bytes + HeaderBytes - 1) / HeaderBytes * HeaderBytes;

    private int Bit(long position) => (int)(position % RingCapacity);

    private Span<byte> Bitmap() => new(_base + _bitmapAt, BitmapBytes(RingCapacity));

    private Span<byte> Header(int offset, int length) => new(_base + offset, length);

    private static byte* Map(int fd, long length)
    {
        nint mapped = Mmap(0, (nuint)length, ProtRead | ProtWrite, MapShared, fd, 0);
        if (mapped == -1)
        {
            throw Failed("mmap");
        }

        return (byte*)mapped;
    }

    private static IOException Failed(string call)
    {
        int errno = Marshal.GetLastPInvokeError();
        return new IOException(string.Create(CultureInfo.InvariantCulture, $"{call} failed for the relay journal: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})"));
    }

    private const uint MfdCloexec = 1;
    private const int ProtRead = 1;
    private const int ProtWrite = 2;
    private const int MapShared = 1;
    private const int SeekEnd = 2;

    [LibraryImport("libc", EntryPoint = "memfd_create", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int MemfdCreate(string name, uint flags);

    [LibraryImport("libc", EntryPoint = "ftruncate", SetLastError = true)]
    private static partial int Ftruncate(int fd, long length);

    [LibraryImport("libc", EntryPoint = "lseek", SetLastError = true)]
    private static partial long Lseek(int fd, long offset, int whence);

    [LibraryImport("libc", EntryPoint = "mmap", SetLastError = true)]
    private static partial nint Mmap(nint address, nuint length, int protection, int flags, int fd, long offset);

    [LibraryImport("libc", EntryPoint = "munmap", SetLastError = true)]
    private static partial int Munmap(void* address, long length);

    /// <summary>
    /// One unix stream socket's peek offset used as a counter of the bytes its readers consumed: every non-peek recv
    /// lowers it by exactly what it took, inside the same call (even the driver's, in the kernel), so after a kill the
    /// socket itself says where its stream stands. Two slots hold the stream position each arm started at.
    /// </summary>
    public sealed class StreamCounter
    {
        private readonly RelayJournal _journal;
        private readonly int _at;

        internal StreamCounter(RelayJournal journal, int at)
        {
            _journal = journal;
            _at = at;
        }

        /// <summary>The stream position the counter was last armed at.</summary>
        public long Base => Slot(ActiveSlot);

        private int ActiveSlot => Volatile.Read(ref *(int*)(_journal._base + _at + 16)) & 1;

        /// <summary>
        /// After a kill between an arm's setsockopt and its flip (the counter stands at <see cref="ArmedValue"/>, the
        /// spare slot ahead): makes the flip, so that <see cref="Base"/> is the arm's position again.
        /// </summary>
        public void CompleteFlip(Socket socket)
        {
            int active = ActiveSlot;
            if (GetPeekOffset(socket) == ArmedValue && Slot(1 - active) > Slot(active))
            {
                Volatile.Write(ref *(int*)(_journal._base + _at + 16), 1 - active);
            }
        }

        /// <summary>
        /// Starts counting at stream position <paramref name="position"/>, which must be exact at this moment (nothing
        /// consumed meanwhile by anyone). The new base goes to the spare slot before the socket changes, the slot flips
        /// after: a kill in between leaves the counter at exactly <see cref="ArmedValue"/> with the spare slot ahead.
        /// </summary>
        public void Arm(Socket socket, long position) => Arm(socket, position, flip: true);

        /// <summary><see cref="Arm(Socket, long)"/>; without the flip, what a kill between setsockopt and flip leaves (tests).</summary>
        internal void Arm(Socket socket, long position, bool flip)
        {
            int spare = 1 - ActiveSlot;
            Volatile.Write(ref *(long*)(_journal._base + _at + (spare * 8)), position);
            SetPeekOffset(socket, ArmedValue);
            if (flip)
            {
                Volatile.Write(ref *(int*)(_journal._base + _at + 16), spare);
            }
        }

        /// <summary>The stream position the socket's readers have consumed up to.</summary>
        public long Position(Socket socket)
        {
            int value = GetPeekOffset(socket);
            if (value < 0)
            {
                throw new InvalidDataException("the socket's consumption counter (SO_PEEK_OFF) is not armed: it is no end this journal counted on");
            }

            int active = ActiveSlot;
            long spare = Slot(1 - active);
            return value == ArmedValue && spare > Slot(active) ? spare : Slot(active) + (ArmedValue - value);
        }

        private long Slot(int index) => Volatile.Read(ref *(long*)(_journal._base + _at + (index * 8)));
    }

    /// <summary>
    /// Waits for any reader of <paramref name="socket"/> inside a recv to finish its bookkeeping: a peek that finds
    /// nothing to return (MSG_PEEK | MSG_DONTWAIT) takes the same lock a recv holds while it lowers the counter.
    /// </summary>
    public static void SettleReaders(Socket socket)
    {
        byte unused;
        _ = Recv((int)socket.Handle, &unused, 0, MsgPeek | MsgDontWait);
    }

    private const int MsgPeek = 2;
    private const int MsgDontWait = 0x40;

    [LibraryImport("libc", EntryPoint = "recv", SetLastError = true)]
    private static partial nint Recv(int fd, void* buffer, nuint length, int flags);

    private const int SolSocket = 1;
    private const int SoPeekOff = 42;

    private static void SetPeekOffset(Socket socket, int value)
    {
        Span<byte> bytes = stackalloc byte[sizeof(int)];
        BinaryPrimitives.WriteInt32LittleEndian(bytes, value);
        while (true)
        {
            try
            {
                socket.SetRawSocketOption(SolSocket, SoPeekOff, bytes);
                return;
            }
            catch (SocketException e) when (e.SocketErrorCode == SocketError.Interrupted)
            {
                // 6.1 waits for the socket's reader lock interruptibly: a signal (the runtime's own) makes it EINTR.
            }
        }
    }

    private static int GetPeekOffset(Socket socket)
    {
        Span<byte> bytes = stackalloc byte[sizeof(int)];
        _ = socket.GetRawSocketOption(SolSocket, SoPeekOff, bytes);
        return BinaryPrimitives.ReadInt32LittleEndian(bytes);
    }

    /// <summary>The ring's part of the mapping as <see cref="Memory{T}"/>; it lives as long as the journal.</summary>
    private sealed class MappedMemory(byte* start, int length) : MemoryManager<byte>
    {
        public override Span<byte> GetSpan() => new(start, length);

        public override MemoryHandle Pin(int elementIndex = 0) => new(start + elementIndex);

        public override void Unpin()
        {
        }

        protected override void Dispose(bool disposing)
        {
        }
    }
}

/// <summary>How far a journal's relay got.</summary>
internal enum JournalState
{
    /// <summary>Created; no relay armed its counters yet (nothing of either stream was consumed).</summary>
    New = 0,

    /// <summary>A relay keeps it: a successor recovers from it.</summary>
    Armed = 1,

    /// <summary>
    /// The relay stopped keeping it (a request larger than its ring); a successor cannot recover from it, and the
    /// driver's own timeout is what resends then.
    /// </summary>
    Abandoned = 2,
}

/// <summary>The reply being sent to the kernel: [ReplyStart, ReplyStart + Length) of the reply stream.</summary>
internal readonly record struct ReplyRecord(long RequestStart, ulong Cookie, long ReplyStart, long Length);

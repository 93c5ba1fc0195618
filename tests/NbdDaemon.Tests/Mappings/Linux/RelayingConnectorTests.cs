using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using NbdDaemon.Configuration;
using NbdDaemon.Mappings;
using NbdDaemon.Mappings.Linux;
using NbdDaemon.Systemd;
using NbdDaemon.Tests.Systemd;
using TestSupport;

namespace NbdDaemon.Tests.Mappings.Linux;

/// <summary>
/// The relay as the daemon wires it, against a real nbdkit (file plugin) that is killed and started again on the same
/// port; the test plays the driver on the session's socket (raw requests, replies checked byte by byte).
/// </summary>
public sealed class RelayingConnectorTests : IDisposable
{
    private const int DiskSize = 1 << 20;
    private const uint RequestMagic = 0x25609513;
    private const uint ReplyMagic = 0x67446698;
    private readonly TempDirectory _dir = new();
    private readonly int _port = FreePort();
    private Process? _server;

    public void Dispose()
    {
        Kill();
        _dir.Dispose();
    }

    [Fact]
    public async Task ConnectAsync_RelayOff_ReturnsTheServerConnectionItself()
    {
        await StartServerAsync(DiskSize);
        RelayingConnector connector = Connector();

        using INbdSession session = await connector.ConnectAsync(Mapping(relay: false), CancellationToken.None);

        Assert.Equal(AddressFamily.InterNetwork, session.Socket.AddressFamily);
        Assert.Equal(_port, ((IPEndPoint)session.Socket.RemoteEndPoint!).Port);
    }

    [Fact]
    public async Task ConnectAsync_RelayOn_KernelGetsAUnixSocketAndDataRoundTrips()
    {
        await StartServerAsync(DiskSize);
        RelayingConnector connector = Connector();

        using INbdSession session = await connector.ConnectAsync(Mapping(relay: true), CancellationToken.None);
        byte[] data = Pattern(4096, 7);
        Write(session.Socket, 1, 8192, data);

        Assert.Equal(AddressFamily.Unix, session.Socket.AddressFamily);
        Assert.Equal((ulong)DiskSize, session.Export.Size);
        Assert.Equal(data, Read(session.Socket, 2, 8192, 4096));
        Assert.Equal(data, File.ReadAllBytes(_dir.File("disk.img")).AsSpan(8192, 4096).ToArray());
    }

    [Fact]
    public async Task ServerKilledWithARequestInFlight_RestartedOneSecondLater_RequestAnsweredRightAfterTheRestart()
    {
        await StartServerAsync(DiskSize);
        RelayingConnector connector = Connector();
        using INbdSession session = await connector.ConnectAsync(Mapping(relay: true), CancellationToken.None);
        byte[] data = Pattern(65536, 3);
        Write(session.Socket, 1, 0, data);

        Kill();
        // The read goes out while no server runs: the relay holds it and sends it on the next connection.
        Send(session.Socket, Request(0, 2, 0, (uint)data.Length));
        await Task.Delay(1000);
        await StartServerAsync(DiskSize);
        var back = Stopwatch.StartNew();
        byte[] read = ReceiveReply(session.Socket, 2, data.Length);
        back.Stop();

        Assert.Equal(data, read);
        // Nominally a 250 ms retry pause plus a connect and handshake with the fresh nbdkit (≈ 0.3 s); the bound leaves
        // room for a loaded host and still tells "at the next attempt" from "after GiveUpAfter" (10 s).
        Assert.True(back.Elapsed < TimeSpan.FromSeconds(3), $"reply came {back.ElapsedMilliseconds} ms after the server accepted again");
    }

    [Fact]
    public async Task ServerComesBackWithAnotherSize_RelayGivesUpAtOnceAndClosesTheKernelsEnd()
    {
        await StartServerAsync(DiskSize);
        RelayingConnector connector = Connector();
        using INbdSession session = await connector.ConnectAsync(Mapping(relay: true, timeout: TimeSpan.FromSeconds(20)), CancellationToken.None);

        Kill();
        Send(session.Socket, Request(0, 5, 0, 512));
        await StartServerAsync(DiskSize * 2);
        var back = Stopwatch.StartNew();
        session.Socket.ReceiveTimeout = 10_000;
        int received = session.Socket.Receive(new byte[16]);

        Assert.Equal(0, received); // no reply invented: the kernel's end is closed, the driver sees a dead connection
        Assert.True(back.Elapsed < TimeSpan.FromSeconds(5), $"gave up after {back.ElapsedMilliseconds} ms, not at once");
    }

    [Fact]
    public async Task ServerStaysDown_RelayGivesUpAfterTimeout()
    {
        await StartServerAsync(DiskSize);
        RelayingConnector connector = Connector();
        using INbdSession session = await connector.ConnectAsync(Mapping(relay: true, timeout: TimeSpan.FromSeconds(2)), CancellationToken.None);

        var down = Stopwatch.StartNew();
        Kill();
        session.Socket.ReceiveTimeout = 10_000;
        int received = session.Socket.Receive(new byte[16]);

        Assert.Equal(0, received);
        Assert.InRange(down.Elapsed, TimeSpan.FromSeconds(1.8), TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task ServerKilledThreeTimes_EachDeadConnectionsSessionIsReleased()
    {
        // The relay hides connection cuts from the mapping, so its session may live for months: a session kept per cut
        // would grow without bound.
        await StartServerAsync(DiskSize);
        var counting = new CountingConnector(new ProtocolConnector(TimeProvider.System));
        var connector = new RelayingConnector(counting, NullLoggerFactory.Instance, TimeProvider.System, new FakeFileDescriptorStore());
        using INbdSession session = await connector.ConnectAsync(Mapping(relay: true), CancellationToken.None);
        byte[] data = Pattern(4096, 5);

        for (ulong round = 1; round <= 3; round++)
        {
            Kill();
            await StartServerAsync(DiskSize);
            Write(session.Socket, round, 4096 * round, data); // answered once the relay reconnected
        }

        Assert.Equal(4, counting.Opened);
        Assert.Equal(1, counting.Open);
    }

    /// <summary>Counts the server sessions the relay got, and those not yet disposed.</summary>
    private sealed class CountingConnector(INbdConnector inner) : INbdConnector
    {
        private int _opened;
        private int _open;

        public int Opened => Volatile.Read(ref _opened);

        public int Open => Volatile.Read(ref _open);

        public async Task<INbdSession> ConnectAsync(MappingOptions mapping, CancellationToken cancellationToken)
        {
            INbdSession session = await inner.ConnectAsync(mapping, cancellationToken);
            Interlocked.Increment(ref _opened);
            Interlocked.Increment(ref _open);
            return new Counted(session, this);
        }

        private sealed class Counted(INbdSession inner, CountingConnector owner) : INbdSession
        {
            private int _disposed;

            public ExportDescription Export => inner.Export;

            public Socket Socket => inner.Socket;

            public void Shutdown() => inner.Shutdown();

            public void Dispose()
            {
                if (Interlocked.Exchange(ref _disposed, 1) == 0)
                {
                    Interlocked.Decrement(ref owner._open);
                }

                inner.Dispose();
            }
        }
    }

    [Fact]
    public async Task Dispose_StopsTheRelayAndClosesTheServerConnection()
    {
        await StartServerAsync(DiskSize);
        RelayingConnector connector = Connector();
        INbdSession session = await connector.ConnectAsync(Mapping(relay: true), CancellationToken.None);
        int before = ServerConnections();

        session.Dispose();

        Assert.Equal(1, before);
        await WaitUntilAsync(() => ServerConnections() == 0, TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task ServerKilled_MappingWithoutDevice_RelayLogNamesTheDeviceTheSessionServes()
    {
        // A netlink mapping without Device learns its device from CONNECT; the relay's lines must name it (journalctl).
        await StartServerAsync(DiskSize);
        var logs = new ListLogger();
        var connector = new RelayingConnector(new ProtocolConnector(TimeProvider.System), logs, TimeProvider.System, new FakeFileDescriptorStore());
        using INbdSession session = await connector.ConnectAsync(Mapping(relay: true) with { Device = null }, CancellationToken.None);

        session.Serves("/dev/nbd7");
        Kill();

        await WaitUntilAsync(() => logs.Entries.Any(e => e.Message.Contains("relay lost the server connection", StringComparison.Ordinal)), TimeSpan.FromSeconds(5));
        string lost = logs.Entries.First(e => e.Message.Contains("relay lost the server connection", StringComparison.Ordinal)).Message;
        Assert.StartsWith("Mapping data on /dev/nbd7: relay lost the server connection", lost, StringComparison.Ordinal);
    }

    [Fact]
    public async Task HandOver_StoreTooSmallForAJournal_TheEndAloneGoesOverAndTheNextProcessTakesItBack()
    {
        // Room for 2 descriptors: not for a journal's group of 3, but for the end a stop hands over without one.
        await StartServerAsync(DiskSize);
        using var store = new FakeFileDescriptorStore(capacity: 2);
        var logs = new ListLogger();
        MappingOptions mapping = Mapping(relay: true) with { Interface = KernelInterface.Netlink, OnStop = StopAction.Leave };
        INbdSession first = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        // The driver's own reference to its end: the session's descriptor closes with the session, the kernel's does not.
        using Socket kernel = Descriptors.Duplicate(first.Socket);
        byte[] data = Pattern(4096, 11);
        Write(kernel, 1, 16384, data);
        first.Serves("/dev/nbd5");

        Assert.Contains(logs.Entries, e => e.Level == LogLevel.Warning && e.Message == "Mapping data on /dev/nbd3: relay keeps no journal (systemd's file descriptor store is full (FileDescriptorStoreMax=2; 3 per relay connection)); should this process be killed, the requests in flight wait for the driver's timeout");
        first.HandOver(0);
        first.Dispose();

        Assert.Equal(["nbd-relay/data/0"], store.Names);
        Assert.Contains(logs.Entries, e => e.Message == "Mapping data on /dev/nbd5: relay stopped between two requests with every reply delivered; its end of the kernel's connection went to systemd's file descriptor store as nbd-relay/data/0, for the next start to resume");
        await WaitUntilAsync(() => ServerConnections() == 0, TimeSpan.FromSeconds(5));

        // While no process relays, the kernel's next request waits in the socket.
        Send(kernel, Request(0, 2, 16384, 4096));
        using INbdSession next = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        Assert.True(next.Resumed);
        Assert.Empty(store.Names);
        await Task.Delay(300);
        Assert.Equal(0, kernel.Available); // nothing relayed before the mapping adopted the device with it

        next.Serves("/dev/nbd5");
        Assert.Equal(data, ReceiveReply(kernel, 2, 4096));
        Assert.Equal(data, Read(kernel, 3, 16384, 4096));
        Assert.Contains(logs.Entries, e => e.Message == "Mapping data on /dev/nbd5: relay resumed on the kernel's connection handed over by the previous process; the kernel's requests carry on from where it stopped");
    }

    /// <summary>
    /// A netlink relay run with a store keeps its journal there, with both ends of the kernel's connection, from the
    /// moment the kernel took its end (Serves) until the session ends; the room is held from the connect on.
    /// </summary>
    [Fact]
    public async Task Journal_InTheStoreWhileTheSessionServes_TakenOutWhenItEnds()
    {
        await StartServerAsync(DiskSize);
        using var store = new FakeFileDescriptorStore(capacity: 3);
        var logs = new ListLogger();
        MappingOptions mapping = Mapping(relay: true) with { Interface = KernelInterface.Netlink };
        INbdSession session = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        using Socket kernel = Descriptors.Duplicate(session.Socket);
        Assert.Empty(store.Names);
        Assert.Equal(3, store.Reserved);

        session.Serves("/dev/nbd5");

        string group = JournalGroup(store);
        Assert.Equal([group + "/relay-end", group + "/kernel-end", group + "/journal"], store.Names);
        Assert.Equal(0, store.Reserved);
        Assert.Contains(logs.Entries, e => e.Level == LogLevel.Information && e.Message == $"Mapping data on /dev/nbd5: relay journal and both ends of the kernel's connection are in systemd's file descriptor store as {group}: should this process be killed, the next one carries the connection on");
        using (var journal = Nbd.Protocol.Transmission.RelayJournal.Open(store.Inherit(group + "/journal")))
        {
            Assert.Equal(Nbd.Protocol.Transmission.JournalState.Armed, journal.State);
            Assert.Equal(RelayingConnector.JournalRingBytes, journal.RingCapacity);
        }

        // The stored kernel end is the kernel's connection: a request sent on it is answered on it.
        using (var storedKernel = new Socket(new SafeSocketHandle(store.Inherit(group + "/kernel-end").DangerousGetHandle(), ownsHandle: true)))
        {
            byte[] data = Pattern(4096, 3);
            Write(storedKernel, 1, 4096, data);
            Assert.Equal(data, Read(kernel, 2, 4096, 4096));
        }

        session.Dispose();

        Assert.Empty(store.Names);
        Assert.Equal(0, store.Reserved);
        kernel.ReceiveTimeout = 5000;
        Assert.Equal(0, kernel.Receive(new byte[16]));
    }

    /// <summary>
    /// A stop that leaves the device only quiesces a journaled relay: the group stays in the store, and the next process
    /// takes it, leaves it there while it relays, and carries on with the request the kernel sent meanwhile.
    /// </summary>
    [Fact]
    public async Task Journal_HandOver_GroupStaysAndTheNextProcessResumesFromIt()
    {
        await StartServerAsync(DiskSize);
        using var store = new FakeFileDescriptorStore();
        var logs = new ListLogger();
        MappingOptions mapping = Mapping(relay: true) with { Interface = KernelInterface.Netlink, OnStop = StopAction.Leave };
        byte[] data = Pattern(4096, 11);

        (Socket kernelEnd, string group) = await HandOverJournaledAsync(store, logs, mapping, data);

        using Socket kernel = kernelEnd;
        Assert.Equal(MappingLoop.HandOverTimeout, Nbd.Kernel.NbdSocketTimeout.Read(kernel)); // the driver's sends may block meanwhile
        Assert.Equal(3, store.Names.Count);
        Assert.Contains(logs.Entries, e => e.Message == $"Mapping data on /dev/nbd5: relay stopped between two requests with every reply delivered; its journal {group} stays in systemd's file descriptor store with both ends of the kernel's connection, for the next start to resume");
        await WaitUntilAsync(() => ServerConnections() == 0, TimeSpan.FromSeconds(5));

        Send(kernel, Request(0, 2, 16384, 4096));
        INbdSession next = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        Assert.True(next.Resumed);
        Assert.Equal(3, store.Names.Count);
        await Task.Delay(300);
        Assert.Equal(0, kernel.Available); // nothing relayed before the mapping adopted the device with it

        next.Serves("/dev/nbd5");
        Assert.Equal(mapping.Timeout, Nbd.Kernel.NbdSocketTimeout.Read(kernel));
        Assert.Equal(data, ReceiveReply(kernel, 2, 4096));
        Assert.Equal(data, Read(kernel, 3, 16384, 4096));
        Assert.Contains(logs.Entries, e => e.Message.StartsWith($"Mapping data on /dev/nbd5: relay resumed on the kernel's connection from its journal {group}, which the previous process left in systemd's file descriptor store: 0 requests it had not answered resent, 0 bytes of a reply it had cut off finished", StringComparison.Ordinal));

        next.Dispose();
        Assert.Empty(store.Names);
        kernel.ReceiveTimeout = 5000;
        Assert.Equal(0, kernel.Receive(new byte[16]));
    }

    /// <summary>
    /// A Leave stop while the server does not answer (stopped): the relay cannot reach a point with every reply
    /// delivered, so it stops where it stands and keeps its journal; the next process resends the request the server
    /// never answered, as after a kill, and the driver gets its reply.
    /// </summary>
    [Fact]
    public async Task Journal_HandOverWithAReplyOwed_KeptWhereItStoodAndTheNextProcessResendsTheRequest()
    {
        await StartServerAsync(DiskSize);
        using var store = new FakeFileDescriptorStore();
        var logs = new ListLogger();
        MappingOptions mapping = Mapping(relay: true) with { Interface = KernelInterface.Netlink, OnStop = StopAction.Leave };
        INbdSession first = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        using Socket kernel = Descriptors.Duplicate(first.Socket);
        first.Serves("/dev/nbd5");
        byte[] data = Pattern(4096, 13);
        Write(kernel, 1, 20480, data);
        string group = JournalGroup(store);
        using (Process stop = Process.Start("kill", ["-STOP", _server!.Id.ToString(CultureInfo.InvariantCulture)]))
        {
            await stop.WaitForExitAsync();
        }

        Send(kernel, Request(0, 2, 20480, 4096)); // read by the relay, sent to a server that answers nothing now
        await Task.Delay(300);

        first.HandOver(0);
        first.Dispose();

        Assert.Equal(3, store.Names.Count);
        Assert.Contains(logs.Entries, e => e.Level == LogLevel.Warning && e.Message == $"Mapping data on /dev/nbd5: relay did not reach a point between two requests with every reply delivered within 5 s (1 requests unanswered); it stopped where it stood, and its journal {group} stays in systemd's file descriptor store with both ends of the kernel's connection: the next start carries on from there");
        Assert.Equal(0, kernel.Available); // neither a reply nor the end of the connection
        Kill();
        await StartServerAsync(DiskSize);

        using INbdSession next = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        next.Serves("/dev/nbd5");

        Assert.Equal(data, ReceiveReply(kernel, 2, 4096));
        Assert.Contains(logs.Entries, e => e.Message.StartsWith($"Mapping data on /dev/nbd5: relay resumed on the kernel's connection from its journal {group}, which the previous process left in systemd's file descriptor store: 1 requests it had not answered resent", StringComparison.Ordinal));
        Assert.Equal(data, Read(kernel, 3, 20480, 4096));
    }

    /// <summary>
    /// A request larger than the journal's ring abandons the journal: a successor would refuse it, so its group leaves
    /// the store at once and a Leave stop hands the relay's end over alone, as without a journal.
    /// </summary>
    [Fact]
    public async Task Journal_RequestLargerThanTheRing_GroupLeavesTheStoreAndAStopHandsTheEndOverAlone()
    {
        await StartServerAsync(16 << 20);
        using var store = new FakeFileDescriptorStore();
        var logs = new ListLogger();
        MappingOptions mapping = Mapping(relay: true) with { Interface = KernelInterface.Netlink, OnStop = StopAction.Leave };
        using INbdSession session = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        using Socket kernel = Descriptors.Duplicate(session.Socket);
        session.Serves("/dev/nbd5");
        Assert.Equal(3, store.Names.Count);

        byte[] large = Pattern(RelayingConnector.JournalRingBytes + 4096, 17);
        Write(kernel, 1, 0, large);

        Assert.Empty(store.Names);
        Assert.Contains(logs.Entries, e => e.Level == LogLevel.Warning && e.Message.StartsWith("Mapping data on /dev/nbd5: relay journal abandoned (a request of 8392732 bytes is larger than the journal's ring (8388608 bytes))", StringComparison.Ordinal));
        Assert.Equal(large[..4096], Read(kernel, 2, 0, 4096)); // relaying on

        session.HandOver(0);

        Assert.Equal(["nbd-relay/data/0"], store.Names);
    }

    /// <summary>An attempt that took a group and failed before the mapping served leaves it for the next attempt.</summary>
    [Fact]
    public async Task ResumedJournal_DisposedBeforeItServed_GroupLeftForTheNextAttempt()
    {
        await StartServerAsync(DiskSize);
        using var store = new FakeFileDescriptorStore();
        var logs = new ListLogger();
        MappingOptions mapping = Mapping(relay: true) with { Interface = KernelInterface.Netlink, OnStop = StopAction.Leave };
        (Socket kernelEnd, string group) = await HandOverJournaledAsync(store, logs, mapping);
        using Socket kernel = kernelEnd;
        byte[] data = Pattern(4096, 7);
        Send(kernel, [.. Request(1, 1, 8192, 4096), .. data]); // a write sent while no process relays

        INbdSession attempt = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        Assert.True(attempt.Resumed);
        Assert.Null(store.TakeGroup("nbd-journal/data/", ["relay-end", "kernel-end", "journal"])); // lent to the attempt
        attempt.Dispose();

        Assert.Equal(3, store.Names.Count);
        Assert.Contains(logs.Entries, e => e.Message == $"Mapping data on /dev/nbd3: relay end handed over by the previous process not used by this attempt: given back untouched, as {group}, for the next attempt or start");
        Assert.Equal(0, kernel.Available);

        await AssertNextResumesWithTheWaitingWriteAsync(store, logs, mapping, kernel, data);
    }

    /// <summary>
    /// A group whose journal is none (here: a file too short for its header) is refused with the reason: the kernel's
    /// connection ends (the driver resends after its timeout; the mapping reconnects) and the group leaves the store.
    /// </summary>
    [Fact]
    public async Task ResumedJournal_NotAJournal_RefusedTheKernelsConnectionEndsAndTheGroupLeavesTheStore()
    {
        await StartServerAsync(DiskSize);
        using var store = new FakeFileDescriptorStore();
        var logs = new ListLogger();
        MappingOptions mapping = Mapping(relay: true) with { Interface = KernelInterface.Netlink };
        (Socket kernelEnd, Socket relayEnd) = Nbd.Kernel.NbdSocketPair.Create();
        using Socket kernel = kernelEnd;
        File.WriteAllBytes(_dir.File("junk"), new byte[100]);
        using (relayEnd)
        using (Microsoft.Win32.SafeHandles.SafeFileHandle junk = File.OpenHandle(_dir.File("junk")))
        {
            store.Store("nbd-journal/data/1/relay-end", relayEnd);
            store.Store("nbd-journal/data/1/kernel-end", kernel);
            store.Store("nbd-journal/data/1/journal", junk);
        }

        using INbdSession session = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        Assert.True(session.Resumed);
        session.Serves("/dev/nbd5");

        Assert.Contains(logs.Entries, e => e.Level == LogLevel.Warning && e.Message == "Mapping data on /dev/nbd5: relay journal nbd-journal/data/1 left by the previous process refused (the relay journal is 100 bytes, less than its header); the kernel's connection is ended and the driver resends its requests after its timeout");
        Assert.Empty(store.Names);
        kernel.ReceiveTimeout = 5000;
        Assert.Equal(0, kernel.Receive(new byte[16]));
    }

    /// <summary>
    /// The next attempt takes what the store holds for <paramref name="mapping"/>, resumes on it once it serves, and
    /// answers the write of <paramref name="data"/> at 8192 (cookie 1) that waited in the kernel's end meanwhile.
    /// </summary>
    private static async Task AssertNextResumesWithTheWaitingWriteAsync(FakeFileDescriptorStore store, ListLogger logs, MappingOptions mapping, Socket kernel, byte[] data)
    {
        using INbdSession next = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        Assert.True(next.Resumed);
        next.Serves("/dev/nbd5");
        ReceiveReply(kernel, 1, 0);
        Assert.Equal(data, Read(kernel, 2, 8192, 4096));
    }

    /// <summary>
    /// A journaled session that served (after a write of <paramref name="written"/> at 16384, when given) and was handed
    /// over at a Leave stop: the kernel's end (a duplicate, as the driver holds it) and the group left in the store.
    /// </summary>
    private static async Task<(Socket Kernel, string Group)> HandOverJournaledAsync(FakeFileDescriptorStore store, ListLogger logs, MappingOptions mapping, byte[]? written = null)
    {
        INbdSession first = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        Socket kernel = Descriptors.Duplicate(first.Socket);
        first.Serves("/dev/nbd5");
        if (written is not null)
        {
            Write(kernel, 1, 16384, written);
        }

        string group = JournalGroup(store);
        first.HandOver(0);
        first.Dispose();
        return (kernel, group);
    }

    /// <summary>The one journal group in <paramref name="store"/>: "nbd-journal/data/" and 12 hex digits.</summary>
    private static string JournalGroup(FakeFileDescriptorStore store)
    {
        string group = Assert.Single(store.Names.Select(n => n[..n.LastIndexOf('/')]).Distinct());
        Assert.Matches("^nbd-journal/data/[0-9a-f]{12}$", group);
        return group;
    }

    /// <summary>
    /// A handed-over end taken by an attempt that then fails before the mapping serves (a second connection refused, a
    /// stop): nothing was read from it, so it goes back to the store, the kernel's connection stays, and the next attempt
    /// takes it and relays the request that waited meanwhile.
    /// </summary>
    [Fact]
    public async Task ResumedSession_DisposedBeforeItServed_EndBackInTheStoreAndTheNextAttemptRelaysOnIt()
    {
        await StartServerAsync(DiskSize);
        using var store = new FakeFileDescriptorStore();
        var logs = new ListLogger();
        MappingOptions mapping = Mapping(relay: true) with { Interface = KernelInterface.Netlink, OnStop = StopAction.Leave };
        (Socket kernelEnd, Socket relayEnd) = Nbd.Kernel.NbdSocketPair.Create();
        using Socket kernel = kernelEnd;
        store.Store("nbd-relay/data/1", relayEnd);
        relayEnd.Dispose();
        byte[] data = Pattern(4096, 5);
        Send(kernel, [.. Request(1, 1, 8192, 4096), .. data]); // a write the kernel sent while no process relayed

        INbdSession attempt = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        Assert.True(attempt.Resumed);
        Assert.Empty(store.Names);
        attempt.Dispose();

        // Not under its slot name: a stop may be handing the mapping's other relays over under those right now.
        Assert.Equal(["nbd-relay/data/returned-1"], store.Names);
        Assert.Contains(logs.Entries, e => e.Message == "Mapping data on /dev/nbd3: relay end handed over by the previous process not used by this attempt: given back untouched, as nbd-relay/data/returned-1, for the next attempt or start");
        await WaitUntilAsync(() => ServerConnections() == 0, TimeSpan.FromSeconds(5));
        Assert.Equal(0, kernel.Available); // not answered, not closed: the request still waits

        INbdSession again = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        Assert.True(again.Resumed);
        again.Dispose();
        Assert.Equal(["nbd-relay/data/returned-1"], store.Names); // given back twice: the name does not grow

        await AssertNextResumesWithTheWaitingWriteAsync(store, logs, mapping, kernel, data);
    }

    [Fact]
    public async Task ResumedSession_ShutDownThenDisposed_NotGivenBackAndTheKernelsConnectionEnds()
    {
        await StartServerAsync(DiskSize);
        using var store = new FakeFileDescriptorStore();
        MappingOptions mapping = Mapping(relay: true) with { Interface = KernelInterface.Netlink, OnStop = StopAction.Leave };
        (Socket kernelEnd, Socket relayEnd) = Nbd.Kernel.NbdSocketPair.Create();
        using Socket kernel = kernelEnd;
        store.Store("nbd-relay/data/0", relayEnd);
        relayEnd.Dispose();

        INbdSession attempt = await Connector(store).ConnectAsync(mapping, CancellationToken.None);
        attempt.Shutdown();
        attempt.Dispose();

        Assert.Empty(store.Names);
        kernel.ReceiveTimeout = 5000;
        Assert.Equal(0, kernel.Receive(new byte[16]));
    }

    [Fact]
    public async Task HandOver_NoStore_LoggedAndTheKernelsConnectionEndsWithTheSession()
    {
        await StartServerAsync(DiskSize);
        var store = new FakeFileDescriptorStore(canStore: false);
        var logs = new ListLogger();
        MappingOptions mapping = Mapping(relay: true) with { Interface = KernelInterface.Netlink, OnStop = StopAction.Leave };
        INbdSession session = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        using Socket kernel = Descriptors.Duplicate(session.Socket);
        session.Serves("/dev/nbd5");

        session.HandOver(0);
        session.Dispose();

        Assert.Empty(store.Names);
        Assert.Contains(logs.Entries, e => e.Level == LogLevel.Warning && e.Message.StartsWith("Mapping data on /dev/nbd5: relay not handed over (not run by systemd with a file descriptor store)", StringComparison.Ordinal));
        kernel.ReceiveTimeout = 5000;
        Assert.Equal(0, kernel.Receive(new byte[16]));
    }

    [Fact]
    public async Task HandOver_StoreFull_NotStoppedNotRaisedAndSaysWhy()
    {
        // systemd would close an end beyond FileDescriptorStoreMax= (FDSTORE=, systemd 254+) with a line in its own log
        // only: the relay must not stop reading for it, nor leave the kernel's end at the hand-over timeout.
        await StartServerAsync(DiskSize);
        using var store = new FakeFileDescriptorStore(capacity: 1);
        (Socket otherKernel, Socket otherEnd) = Nbd.Kernel.NbdSocketPair.Create();
        using (otherKernel)
        using (otherEnd)
        {
            store.Store("nbd-relay/other/0", otherEnd); // the one place taken
        }

        var logs = new ListLogger();
        MappingOptions mapping = Mapping(relay: true) with { Interface = KernelInterface.Netlink, OnStop = StopAction.Leave };
        INbdSession session = await Connector(store, logs).ConnectAsync(mapping, CancellationToken.None);
        using Socket kernel = Descriptors.Duplicate(session.Socket);
        session.Serves("/dev/nbd5");
        TimeSpan before = Nbd.Kernel.NbdSocketTimeout.Read(kernel);

        session.HandOver(0);

        Assert.Equal(["nbd-relay/other/0"], store.Names);
        Assert.Contains(logs.Entries, e => e.Level == LogLevel.Warning && e.Message.StartsWith("Mapping data on /dev/nbd5: relay not handed over (systemd's file descriptor store is full (FileDescriptorStoreMax=1): raise it in the unit to hand every relay connection over);", StringComparison.Ordinal));
        Assert.Equal(before, Nbd.Kernel.NbdSocketTimeout.Read(kernel));
        byte[] data = Pattern(4096, 5);
        Write(kernel, 1, 8192, data); // still relaying
        Assert.Equal(data, Read(kernel, 2, 8192, 4096));
        session.Dispose();
    }

    [Fact]
    public async Task ConnectAsync_IoctlMapping_NeverTakesAStoredEnd()
    {
        await StartServerAsync(DiskSize);
        using var store = new FakeFileDescriptorStore();
        (Socket kernelEnd, Socket relayEnd) = Nbd.Kernel.NbdSocketPair.Create();
        using Socket kernel = kernelEnd;
        store.Store("nbd-relay/data/0", relayEnd);
        relayEnd.Dispose();

        using INbdSession session = await Connector(store).ConnectAsync(Mapping(relay: true), CancellationToken.None);

        Assert.False(session.Resumed);
        Assert.Equal(["nbd-relay/data/0"], store.Names);
    }

    /// <summary>As the host wires it (DaemonHost): the relay around the real protocol connector.</summary>
    private static RelayingConnector Connector(IFileDescriptorStore? store = null, ILoggerFactory? logs = null) =>
        new(new ProtocolConnector(TimeProvider.System), logs ?? NullLoggerFactory.Instance, TimeProvider.System, store ?? new FakeFileDescriptorStore());

    private MappingOptions Mapping(bool relay, TimeSpan? timeout = null) => TestMappings.Create(timeout: timeout ?? TimeSpan.FromSeconds(10)) with
    {
        Uri = $"nbd://127.0.0.1:{_port}/",
        Relay = relay,
    };

    private async Task StartServerAsync(int size)
    {
        string image = _dir.File("disk.img");
        if (!File.Exists(image) || new FileInfo(image).Length != size)
        {
            await using var file = File.Create(image);
            file.SetLength(size);
        }

        // Started by ProcessLauncher: nbdkit dies with the thread that started it. Its log goes to a file (nobody would
        // read a redirected pipe, and a full one blocks nbdkit), through a shell that execs it so that the pid, and
        // what Kill() kills, is nbdkit's.
        string log = _dir.File("nbdkit.log");
        var start = new ProcessStartInfo("sh") { UseShellExecute = false };
        foreach (string arg in (string[])["-c", "exec nbdkit \"$@\" 2>>\"$0\" >&2", log, "--foreground", "-i", "127.0.0.1", "-p", _port.ToString(CultureInfo.InvariantCulture), "file", "file=" + image])
        {
            start.ArgumentList.Add(arg);
        }

        Process server = ProcessLauncher.Start(start);
        _server = server;
        await WaitUntilAsync(() => Accepting() || server.HasExited, TimeSpan.FromSeconds(15));
        if (server.HasExited)
        {
            throw new InvalidOperationException($"nbdkit exited with status {server.ExitCode} before accepting on port {_port}: {File.ReadAllText(log)}");
        }
    }

    private bool Accepting()
    {
        using var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            probe.Connect(IPAddress.Loopback, _port);
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }

    private void Kill()
    {
        if (_server is { } server)
        {
            server.Kill();
            server.WaitForExit();
            server.Dispose();
            _server = null;
        }
    }

    /// <summary>Established TCP connections to the server's port, from /proc/net/tcp.</summary>
    private int ServerConnections()
    {
        string port = _port.ToString("X4", CultureInfo.InvariantCulture);
        return File.ReadLines("/proc/net/tcp").Skip(1)
            .Select(line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            .Count(f => f[1].EndsWith(":" + port, StringComparison.Ordinal) && f[3] == "01");
    }

    private static async Task WaitUntilAsync(Func<bool> condition, TimeSpan limit)
    {
        var watch = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(watch.Elapsed < limit, $"condition not met within {limit.TotalSeconds} s");
            await Task.Delay(20);
        }
    }

    private static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    private static byte[] Pattern(int length, int seed)
    {
        var data = new byte[length];
        new Random(seed).NextBytes(data);
        return data;
    }

    private static byte[] Request(ushort type, ulong cookie, ulong offset, uint length)
    {
        var request = new byte[28];
        BinaryPrimitives.WriteUInt32BigEndian(request, RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(request.AsSpan(6), type);
        BinaryPrimitives.WriteUInt64BigEndian(request.AsSpan(8), cookie);
        BinaryPrimitives.WriteUInt64BigEndian(request.AsSpan(16), offset);
        BinaryPrimitives.WriteUInt32BigEndian(request.AsSpan(24), length);
        return request;
    }

    private static void Write(Socket kernel, ulong cookie, ulong offset, byte[] data)
    {
        Send(kernel, [.. Request(1, cookie, offset, (uint)data.Length), .. data]);
        ReceiveReply(kernel, cookie, 0);
    }

    private static byte[] Read(Socket kernel, ulong cookie, ulong offset, int length)
    {
        Send(kernel, Request(0, cookie, offset, (uint)length));
        return ReceiveReply(kernel, cookie, length);
    }

    private static void Send(Socket socket, byte[] bytes)
    {
        int sent = 0;
        while (sent < bytes.Length)
        {
            sent += socket.Send(bytes.AsSpan(sent));
        }
    }

    private static byte[] ReceiveReply(Socket kernel, ulong cookie, int dataLength)
    {
        kernel.ReceiveTimeout = 15_000;
        byte[] reply = ReceiveExactly(kernel, 16 + dataLength);
        Assert.Equal(ReplyMagic, BinaryPrimitives.ReadUInt32BigEndian(reply));
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32BigEndian(reply.AsSpan(4)));
        Assert.Equal(cookie, BinaryPrimitives.ReadUInt64BigEndian(reply.AsSpan(8)));
        return reply[16..];
    }

    private static byte[] ReceiveExactly(Socket socket, int count)
    {
        var buffer = new byte[count];
        int filled = 0;
        while (filled < count)
        {
            int n = socket.Receive(buffer.AsSpan(filled));
            Assert.True(n > 0, $"the kernel's end was closed after {filled} of {count} bytes");
            filled += n;
        }

        return buffer;
    }
}

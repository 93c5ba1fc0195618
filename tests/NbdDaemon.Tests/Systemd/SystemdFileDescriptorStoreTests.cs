using System.Net.Sockets;
using Microsoft.Extensions.Logging.Abstractions;
using Nbd.Kernel;
using NbdDaemon.Systemd;
using TestSupport;

namespace NbdDaemon.Tests.Systemd;

/// <summary>
/// <see cref="SystemdFileDescriptorStore"/> against a datagram socket standing in for systemd's notification socket:
/// the exact datagrams systemd gets (FDSTORE=1 with the descriptor, FDSTOREREMOVE=1 before an inherited one is used),
/// and how $LISTEN_FDS / $LISTEN_FDNAMES are read.
/// </summary>
public sealed class SystemdFileDescriptorStoreTests : IDisposable
{
    private readonly TempDirectory _dir = new();
    private readonly List<IDisposable> _owned = [];

    public void Dispose()
    {
        foreach (IDisposable owned in _owned)
        {
            owned.Dispose();
        }

        _dir.Dispose();
    }

    [Fact]
    public void FromEnvironment_ListenPidIsOurs_NamesEachDescriptorFromThree()
    {
        SystemdFileDescriptorStore store = FromEnvironment(new()
        {
            ["LISTEN_PID"] = "4242", ["LISTEN_FDS"] = "3", ["LISTEN_FDNAMES"] = "nbd-relay/fs/0::other", ["NOTIFY_SOCKET"] = "/run/systemd/notify",
        });

        Assert.Equal(["nbd-relay/fs/0", "unknown", "other"], store.Inherited);
        Assert.True(store.CanStore);
    }

    [Theory]
    [InlineData("4243", "2")] // another process's (sd_listen_fds ignores them)
    [InlineData(null, "2")]
    [InlineData("4242", "0")]
    [InlineData("4242", "two")]
    [InlineData("4242", "-1")]
    public void FromEnvironment_NotForUs_NothingInherited(string? pid, string fds)
    {
        SystemdFileDescriptorStore store = FromEnvironment(new() { ["LISTEN_PID"] = pid, ["LISTEN_FDS"] = fds, ["LISTEN_FDNAMES"] = "a:b" });

        Assert.Empty(store.Inherited);
    }

    [Theory]
    [InlineData(null, null, false)] // not run by systemd
    [InlineData("/run/systemd/notify", "0", false)] // a store of size 0 (systemd itself leaves FDSTORE unset then)
    [InlineData("/run/systemd/notify", "128", true)]
    [InlineData("/run/systemd/notify", null, true)] // systemd < 254 does not say
    public void CanStore_NeedsANotifySocketAndAStoreNotDisabled(string? notify, string? fdstore, bool expected)
    {
        SystemdFileDescriptorStore store = FromEnvironment(new() { ["NOTIFY_SOCKET"] = notify, ["FDSTORE"] = fdstore });

        Assert.Equal(expected, store.CanStore);
        if (!expected)
        {
            Assert.Throws<InvalidOperationException>(() => store.Store("x", new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified).SafeHandle));
        }
    }

    [Fact]
    public void Store_SendsFdstoreWithTheNameAndADescriptorForTheSameConnection()
    {
        using Socket systemd = Descriptors.BindDatagram(_dir.File("notify"));
        (Socket kernel, Socket relayEnd) = Pair();
        var store = new SystemdFileDescriptorStore(_dir.File("notify"), capacity: null, [], NullLogger.Instance);

        store.Store("nbd-relay/fs/0", relayEnd.SafeHandle);
        relayEnd.Dispose();

        (string text, int[] fds) = Descriptors.Receive(systemd);
        Assert.Equal("FDSTORE=1\nFDNAME=nbd-relay/fs/0", text);
        using Socket kept = new(new SafeSocketHandle(Assert.Single(fds), ownsHandle: true));
        kernel.Send("still connected"u8);
        byte[] buffer = new byte[32];
        Assert.Equal(15, kept.Receive(buffer));
    }

    [Fact]
    public void Take_MatchingPrefix_RemovedFromTheStoreFirstThenReturnedCloseOnExec()
    {
        using Socket systemd = Descriptors.BindDatagram(_dir.File("notify"));
        (Socket kernel, int inherited) = Inherited();
        var store = new SystemdFileDescriptorStore(_dir.File("notify"), null, [("nbd-relay/fs2/0", -1), ("nbd-relay/fs/0", inherited)], NullLogger.Instance);

        using Socket? taken = store.Take("nbd-relay/fs/")?.Socket;

        Assert.NotNull(taken);
        Assert.Equal(("FDSTOREREMOVE=1\nFDNAME=nbd-relay/fs/0", 0), Text(Descriptors.Receive(systemd)));
        Assert.True(Descriptors.IsCloseOnExec(inherited));
        kernel.Send("x"u8);
        Assert.Equal(1, taken.Receive(new byte[1]));
        Assert.Null(store.Take("nbd-relay/fs/"));
        Assert.Equal(["nbd-relay/fs2/0"], store.Inherited); // "fs2" is another mapping, not a longer "fs"
    }

    /// <summary>
    /// A group (the relay's journal with both ends of the kernel's connection) is taken whole, in the members' order,
    /// and stays in systemd's store while it is used: a successor of a process killed meanwhile needs it. Its members
    /// are no ends of their own for <see cref="SystemdFileDescriptorStore.Take"/>.
    /// </summary>
    [Fact]
    public void TakeGroup_WholeGroupInMembersOrderLeftInTheStore_ReturnedForTheNextTake_RemovedByName()
    {
        string[] members = ["relay-end", "kernel-end", "journal"];
        using Socket systemd = Descriptors.BindDatagram(_dir.File("notify"));
        (_, int relayFd) = Inherited();
        (_, int kernelFd) = Inherited();
        int journalFd = Descriptors.Dup(relayFd); // what the memfd is does not matter to the store
        var store = new SystemdFileDescriptorStore(_dir.File("notify"), 10, [
            ("nbd-journal/fs/2/relay-end", -1), // a group without its other members
            ("nbd-journal/fs/1/journal", journalFd),
            ("nbd-journal/fs/1/relay-end", relayFd),
            ("nbd-journal/fs/1/kernel-end", kernelFd)], NullLogger.Instance);

        Assert.Null(store.Take("nbd-journal/fs/")); // a member of a group is no end of its own
        (string group, Microsoft.Win32.SafeHandles.SafeFileHandle[] taken) = Assert.NotNull(store.TakeGroup("nbd-journal/fs/", members));

        Assert.Equal("nbd-journal/fs/1", group);
        Assert.Equal([relayFd, kernelFd, journalFd], taken.Select(t => (int)t.DangerousGetHandle()));
        Assert.All(taken, t => Assert.True(Descriptors.IsCloseOnExec((int)t.DangerousGetHandle())));
        Assert.Equal(0, systemd.Available); // no FDSTOREREMOVE
        Assert.Null(store.TakeGroup("nbd-journal/fs/", members));
        Assert.Equal(["nbd-journal/fs/2/relay-end"], store.Inherited);

        store.ReturnGroup(group, members, taken);
        Assert.Equal(0, systemd.Available);
        (_, Microsoft.Win32.SafeHandles.SafeFileHandle[] again) = Assert.NotNull(store.TakeGroup("nbd-journal/fs/", members));
        Assert.Equal(relayFd, (int)again[0].DangerousGetHandle());

        Assert.True(store.Remove(group + "/journal"));
        Assert.Equal(("FDSTOREREMOVE=1\nFDNAME=nbd-journal/fs/1/journal", 0), Text(Descriptors.Receive(systemd)));
        foreach (var handle in again)
        {
            handle.Dispose();
        }
    }

    [Fact]
    public void TryReserve_FdstoreSaysTheSize_CountsWhatIsInTheStoreAndARemovalMakesRoom()
    {
        // systemd 254+ sets FDSTORE to FileDescriptorStoreMax= and closes a descriptor beyond it, saying so only in its
        // own log: an inherited descriptor is in the store until removed, a reservation holds its room until used or
        // given up.
        using Socket systemd = Descriptors.BindDatagram(_dir.File("notify"));
        (Socket kernel, int inherited) = Inherited();
        using (kernel)
        {
            Assert.Equal(2, FromEnvironment(new() { ["NOTIFY_SOCKET"] = _dir.File("notify"), ["FDSTORE"] = "2" }).Capacity);
            var store = new SystemdFileDescriptorStore(_dir.File("notify"), 2, [("nbd-relay/fs/0", inherited)], NullLogger.Instance);

            Assert.True(store.TryReserve());
            Assert.False(store.TryReserve()); // 1 inherited + 1 reserved
            store.Unreserve();
            Assert.True(store.TryReserve());

            using Socket? taken = store.Take("nbd-relay/fs/")?.Socket; // FDSTOREREMOVE: one fewer in the store
            Assert.NotNull(taken);
            Assert.True(store.TryReserve());
            Assert.False(store.TryReserve());
        }
    }

    [Fact]
    public void GiveBack_StoreFull_KeptForThisProcessOnlyAndSaysWhy()
    {
        using Socket systemd = Descriptors.BindDatagram(_dir.File("notify"));
        var logs = new ListLogger();
        var store = new SystemdFileDescriptorStore(_dir.File("notify"), 1, [], logs);
        Assert.True(store.TryReserve());
        (Socket kernel, Socket relayEnd) = Pair();
        using (kernel)
        {
            store.GiveBack("nbd-relay/fs/returned-0", relayEnd);

            Assert.Contains(logs.Entries, e => e.Message == "Descriptor nbd-relay/fs/returned-0 could not go back to systemd's file descriptor store (the store is full: FileDescriptorStoreMax=1): kept for this process only, a stop now closes it");
            systemd.ReceiveTimeout = 200;
            Assert.Throws<SocketException>(() => systemd.Receive(new byte[64])); // no FDSTORE=1 went out
            using Socket? again = store.Take("nbd-relay/fs/")?.Socket;
            Assert.Same(relayEnd, again);
        }
    }

    [Fact]
    public void TryReserve_SizeUnknown_AlwaysRoom()
    {
        // Before systemd 254 FDSTORE is never set: nothing to count against.
        var store = new SystemdFileDescriptorStore(_dir.File("notify"), null, [], NullLogger.Instance);
        Assert.Null(store.Capacity);
        for (int i = 0; i < 200; i++)
        {
            Assert.True(store.TryReserve());
        }
    }

    [Fact]
    public void Take_RemovalFails_NotUsedAndClosed()
    {
        // Used while still in the store, a later start would get it back in the middle of a request.
        (Socket kernel, int inherited) = Inherited();
        var logs = new ListLogger();
        var store = new SystemdFileDescriptorStore(_dir.File("nobody-listens"), null, [("nbd-relay/fs/0", inherited)], logs);

        Assert.Null(store.Take("nbd-relay/fs/"));

        kernel.ReceiveTimeout = 5000;
        Assert.Equal(0, kernel.Receive(new byte[1])); // closed: the kernel's connection ends
        Assert.Contains(logs.Entries, e => e.Message.StartsWith("Inherited descriptor nbd-relay/fs/0 not used: removing it from systemd's file descriptor store failed (", StringComparison.Ordinal));
    }

    [Fact]
    public void Take_NotAStreamSocket_RefusedClosedAndTheNextOneTaken()
    {
        using Socket systemd = Descriptors.BindDatagram(_dir.File("notify"));
        using var datagram = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        (Socket kernel, int good) = Inherited();
        var logs = new ListLogger();
        var store = new SystemdFileDescriptorStore(_dir.File("notify"), null, [("nbd-relay/fs/0", Descriptors.Dup((int)datagram.Handle)), ("nbd-relay/fs/1", good)], logs);

        using Socket? taken = store.Take("nbd-relay/fs/")?.Socket;

        Assert.NotNull(taken);
        Assert.Equal(good, (int)taken.Handle);
        Assert.Contains(logs.Entries, e => e.Message.StartsWith("Inherited descriptor nbd-relay/fs/0 not used: inherited descriptor ", StringComparison.Ordinal) && e.Message.Contains("not an AF_UNIX stream socket", StringComparison.Ordinal));
        Assert.Equal("FDSTOREREMOVE=1\nFDNAME=nbd-relay/fs/0", Descriptors.Receive(systemd).Text);
        Assert.Equal("FDSTOREREMOVE=1\nFDNAME=nbd-relay/fs/1", Descriptors.Receive(systemd).Text);
        kernel.Dispose();
    }

    [Fact]
    public void ReleaseUnclaimed_RemovesAndClosesWhatNobodyTookAndItSelects()
    {
        using Socket systemd = Descriptors.BindDatagram(_dir.File("notify"));
        (Socket kernel, int inherited) = Inherited();
        (Socket keptKernel, int kept) = Inherited();
        var store = new SystemdFileDescriptorStore(_dir.File("notify"), null, [("nbd-relay/gone/0", inherited), ("nbd-relay/fs/0", kept)], NullLogger.Instance);

        Assert.Equal(["nbd-relay/gone/0"], store.ReleaseUnclaimed(name => name.StartsWith("nbd-relay/gone/", StringComparison.Ordinal)));

        Assert.Equal("FDSTOREREMOVE=1\nFDNAME=nbd-relay/gone/0", Descriptors.Receive(systemd).Text);
        kernel.ReceiveTimeout = 5000;
        Assert.Equal(0, kernel.Receive(new byte[1]));
        Assert.Empty(store.ReleaseUnclaimed(name => name.StartsWith("nbd-relay/gone/", StringComparison.Ordinal)));
        Assert.Equal(["nbd-relay/fs/0"], store.Inherited);

        // The one not selected is still open, and still takeable.
        using Socket? taken = store.Take("nbd-relay/fs/")?.Socket;
        Assert.NotNull(taken);
        taken.Send([7]);
        keptKernel.ReceiveTimeout = 5000;
        byte[] one = new byte[1];
        Assert.Equal(1, keptKernel.Receive(one));
        Assert.Equal(7, one[0]);
        keptKernel.Dispose();
        kernel.Dispose();
    }

    [Fact]
    public void GiveBack_TakenEnd_StoredAgainUnderItsNameAndTakenAgainUntouched()
    {
        using Socket systemd = Descriptors.BindDatagram(_dir.File("notify"));
        (Socket kernel, int inherited) = Inherited();
        var store = new SystemdFileDescriptorStore(_dir.File("notify"), null, [("nbd-relay/fs/1", inherited)], NullLogger.Instance);
        (string name, Socket socket) = Assert.NotNull(store.Take("nbd-relay/fs/"));
        Assert.Equal("FDSTOREREMOVE=1\nFDNAME=nbd-relay/fs/1", Descriptors.Receive(systemd).Text);
        kernel.Send("queued"u8); // a request the kernel sent meanwhile: it must reach whoever takes the end next

        store.GiveBack(name, socket);

        // Back in systemd's store, a descriptor for the same connection: a stop from here on leaves it to the next start.
        (string text, int[] fds) = Descriptors.Receive(systemd);
        Assert.Equal("FDSTORE=1\nFDNAME=nbd-relay/fs/1", text);
        new Socket(new SafeSocketHandle(Assert.Single(fds), ownsHandle: true)).Dispose();
        Assert.Equal(["nbd-relay/fs/1"], store.Inherited);

        (string againName, Socket again) = Assert.NotNull(store.Take("nbd-relay/fs/"));
        using Socket taken = again;
        Assert.Equal("nbd-relay/fs/1", againName);
        Assert.Equal("FDSTOREREMOVE=1\nFDNAME=nbd-relay/fs/1", Descriptors.Receive(systemd).Text);
        byte[] buffer = new byte[16];
        Assert.Equal(6, taken.Receive(buffer));
        Assert.Equal("queued"u8.ToArray(), buffer[..6]);
        Assert.Empty(store.Inherited);
    }

    [Fact]
    public void GiveBack_ThenReleaseUnclaimed_ClosedAndRemovedFromTheStore()
    {
        using Socket systemd = Descriptors.BindDatagram(_dir.File("notify"));
        (Socket kernel, int inherited) = Inherited();
        var store = new SystemdFileDescriptorStore(_dir.File("notify"), null, [("nbd-relay/fs/0", inherited)], NullLogger.Instance);
        (string name, Socket socket) = Assert.NotNull(store.Take("nbd-relay/fs/"));
        store.GiveBack(name, socket);
        Descriptors.Receive(systemd); // FDSTOREREMOVE
        new Socket(new SafeSocketHandle(Assert.Single(Descriptors.Receive(systemd).Fds), ownsHandle: true)).Dispose(); // FDSTORE

        Assert.Equal(["nbd-relay/fs/0"], store.ReleaseUnclaimed(_ => true));

        Assert.Equal("FDSTOREREMOVE=1\nFDNAME=nbd-relay/fs/0", Descriptors.Receive(systemd).Text);
        kernel.ReceiveTimeout = 5000;
        Assert.Equal(0, kernel.Receive(new byte[1]));
    }

    [Fact]
    public void GiveBack_StoreRefuses_KeptForThisProcessAndLogged()
    {
        (Socket kernel, int inherited) = Inherited();
        var logs = new ListLogger();
        // Taking needs the removal to work; giving back then finds nobody listening.
        string notify = _dir.File("notify");
        SystemdFileDescriptorStore store;
        (string Name, Socket Socket) taken;
        using (Descriptors.BindDatagram(notify))
        {
            store = new SystemdFileDescriptorStore(notify, null, [("nbd-relay/fs/0", inherited)], logs);
            taken = Assert.NotNull(store.Take("nbd-relay/fs/"));
        }

        File.Delete(notify);
        store.GiveBack(taken.Name, taken.Socket);

        Assert.Contains(logs.Entries, e => e.Message.StartsWith("Descriptor nbd-relay/fs/0 could not go back to systemd's file descriptor store (", StringComparison.Ordinal));
        Assert.Equal(["nbd-relay/fs/0"], store.Inherited);
        kernel.Send([9]);
        using Socket socket = taken.Socket;
        Assert.Equal(1, socket.Receive(new byte[1])); // still open
    }

    private static SystemdFileDescriptorStore FromEnvironment(Dictionary<string, string?> variables) =>
        SystemdFileDescriptorStore.FromEnvironment(name => variables.GetValueOrDefault(name), 4242, NullLogger.Instance);

    private static (string Text, int Fds) Text((string Text, int[] Fds) datagram) => (datagram.Text, datagram.Fds.Length);

    /// <summary>A pair whose relay end exists only as a bare descriptor, as the next process inherits it.</summary>
    private (Socket Kernel, int Fd) Inherited()
    {
        (Socket kernel, Socket relayEnd) = Pair();
        int fd = Descriptors.Dup((int)relayEnd.Handle);
        relayEnd.Dispose();
        return (kernel, fd);
    }

    private (Socket Kernel, Socket RelayEnd) Pair()
    {
        (Socket kernel, Socket relayEnd) = NbdSocketPair.Create();
        _owned.Add(kernel);
        return (kernel, relayEnd);
    }
}

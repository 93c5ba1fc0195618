// Exercises Nbd.Kernel against the real nbd driver (inside the VM). Prints "RESULT probe-<step> key=value ..."
// lines; deciding pass/fail is left to whoever reads them (see README.md for what was observed).
using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using Nbd.Kernel;

const int Port = 10809;
const string Backing = "/tmp/probe.img"; // export "probe", 64 MiB; export "odd" is /tmp/odd.img, 10 MiB + 1000 bytes

// Geometry: block size, size in bytes (rounded down) or in blocks, timeout -> sysfs size, logical_block_size,
// queue/io_timeout. One connect cycle each on nbd5.
foreach (var (call, bs, export, timeoutS) in new[] { ("bytes", 512u, "odd", 7), ("bytes", 1024u, "odd", 11), ("bytes", 4096u, "odd", 13), ("blocks", 4096u, "probe", 17) })
{
    await Step("geometry", async r =>
    {
        r["call"] = call;
        r["bs"] = bs.ToString(CultureInfo.InvariantCulture);
        r["export"] = export;
        var (socket, size, flags) = Handshake(export);
        r["export_bytes"] = size.ToString(CultureInfo.InvariantCulture);
        using var device = NbdDevice.Open("/dev/nbd5");
        device.SetBlockSize(bs);
        if (call == "bytes")
        {
            r["size_set"] = device.SetSizeBytes(size).ToString(CultureInfo.InvariantCulture);
        }
        else
        {
            ulong blocks = size / bs - 3; // deliberately not the export size: the sysfs size must follow the call
            device.SetSizeBlocks(blocks);
            r["blocks_set"] = blocks.ToString(CultureInfo.InvariantCulture);
        }
        device.SetFlags(flags);
        device.SetTimeout(TimeSpan.FromSeconds(timeoutS));
        r["timeout_s"] = timeoutS.ToString(CultureInfo.InvariantCulture);
        device.SetSocket(socket);
        var loop = device.StartServiceLoop();
        r["connect_ms"] = WaitSysfs(5, connected: true).ToString(CultureInfo.InvariantCulture);
        var status = NbdSysfs.Read(5);
        r["sysfs_size"] = status.SizeBytes.ToString(CultureInfo.InvariantCulture);
        r["sysfs_lbs"] = status.LogicalBlockSize.ToString(CultureInfo.InvariantCulture);
        r["io_timeout_ms"] = ReadSys("/sys/block/nbd5/queue/io_timeout");
        loop.Stop();
        r["errno"] = (await loop.Completion.WaitAsync(TimeSpan.FromSeconds(15))).ErrnoName ?? "0";
        device.Dispose();
        r["free_ms"] = WaitSysfs(5, connected: false).ToString(CultureInfo.InvariantCulture);
        socket.Dispose();
    });
}

// A datagram socket (the 6.1 driver would take a UDP socket: it only asks for a shutdown callout) and a stream
// socket that is not connected are refused by the library; the device stays untouched and usable.
await Step("non-stream-socket", async r =>
{
    using var device = NbdDevice.Open("/dev/nbd6");
    using var udp = new Socket(AddressFamily.InterNetwork, SocketType.Dgram, ProtocolType.Udp);
    udp.Connect(new IPEndPoint(IPAddress.Loopback, Port));
    r["udp_set_socket"] = Refusal(() => device.SetSocket(udp));
    r["udp_set_sockets"] = Refusal(() => device.SetSockets([udp]));
    using var unconnected = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
    r["unconnected_tcp"] = Refusal(() => device.SetSocket(unconnected));
    var after = NbdSysfs.Read(6);
    r["sysfs_size_after"] = after.SizeBytes.ToString(CultureInfo.InvariantCulture);
    r["pid_after"] = after.Pid is null ? "absent" : "present";
    // The same descriptor and thread can still be set up with a proper socket.
    var (socket, size, flags) = Handshake("probe");
    device.SetSizeBytes(size);
    device.SetFlags(flags);
    device.SetSocket(socket);
    var loop = device.StartServiceLoop();
    r["connect_ms"] = WaitSysfs(6, connected: true).ToString(CultureInfo.InvariantCulture);
    r["backing"] = WriteAndCheck("/dev/nbd6", 6 << 20, 1 << 20);
    loop.Stop();
    await loop.Completion.WaitAsync(TimeSpan.FromSeconds(15));
    device.Dispose();
    r["free_ms"] = WaitSysfs(6, connected: false).ToString(CultureInfo.InvariantCulture);
    socket.Dispose();
});

await Step("ioctl-session", async r =>
{
    var (socket, size, flags) = Handshake();
    using var device = NbdDevice.Open("/dev/nbd0");
    device.SetBlockSize(4096);
    r["size_set"] = device.SetSizeBytes(size + 1000).ToString(CultureInfo.InvariantCulture); // rounds down
    device.SetFlags(flags);
    device.SetTimeout(TimeSpan.FromSeconds(30));
    r["clear_que"] = Outcome(device.ClearQueue);
    device.SetSocket(socket);
    var loop = device.StartServiceLoop();
    r["connect_ms"] = WaitSysfs(0, connected: true).ToString(CultureInfo.InvariantCulture);
    var status = NbdSysfs.Read(0);
    r["sysfs_size"] = status.SizeBytes.ToString(CultureInfo.InvariantCulture);
    r["sysfs_lbs"] = status.LogicalBlockSize.ToString(CultureInfo.InvariantCulture);
    r["pid_is_process"] = (status.Pid == Environment.ProcessId).ToString();
    r["pid_is_our_thread"] = Directory.Exists($"/proc/self/task/{status.Pid}").ToString();
    r["loop_thread_name"] = ReadSys($"/proc/self/task/{status.Pid}/comm");
    r["clear_que_connected"] = Outcome(device.ClearQueue); // harmless: I/O below still has to round-trip
    r["backing"] = WriteAndCheck("/dev/nbd0", 0, 4 << 20);
    var sw = Stopwatch.StartNew();
    loop.Stop();
    var result = await loop.Completion.WaitAsync(TimeSpan.FromSeconds(15));
    r["stop_ms"] = sw.ElapsedMilliseconds.ToString(CultureInfo.InvariantCulture);
    r["stopped_by_request"] = result.StoppedByRequest.ToString();
    r["errno"] = result.ErrnoName ?? "0";
    r["pid_after_stop_before_dispose"] = (NbdSysfs.Read(0).Pid is not null).ToString();
    device.Dispose();
    r["free_ms"] = WaitSysfs(0, connected: false).ToString(CultureInfo.InvariantCulture);
    socket.Dispose();
});

// NBD_DISCONNECT (not Stop): the server closes, NBD_DO_IT returns, Dispose frees the device.
await Step("ioctl-disconnect", async r =>
{
    var (socket, size, flags) = Handshake();
    using var device = NbdDevice.Open("/dev/nbd0");
    device.SetSizeBytes(size);
    device.SetFlags(flags);
    device.SetSocket(socket);
    var loop = device.StartServiceLoop();
    r["connect_ms"] = WaitSysfs(0, connected: true).ToString(CultureInfo.InvariantCulture);
    var sw = Stopwatch.StartNew();
    device.Disconnect();
    var result = await loop.Completion.WaitAsync(TimeSpan.FromSeconds(15));
    r["return_ms"] = sw.ElapsedMilliseconds.ToString(CultureInfo.InvariantCulture);
    r["stopped_by_request"] = result.StoppedByRequest.ToString();
    r["errno"] = result.ErrnoName ?? "0";
    device.Dispose();
    r["free_ms"] = WaitSysfs(0, connected: false).ToString(CultureInfo.InvariantCulture);
    var after = NbdSysfs.Read(0);
    r["size_after"] = after.SizeBytes.ToString(CultureInfo.InvariantCulture);
    r["pid_after"] = File.Exists("/sys/block/nbd0/pid") ? "present" : "absent";
    socket.Dispose();
});

await Step("ioctl-reuse", async r =>
{
    var (socket, size, flags) = Handshake();
    using var device = NbdDevice.Open("/dev/nbd0");
    device.SetBlockSize(1024);
    device.SetSizeBytes(size);
    device.SetFlags(flags);
    device.SetSocket(socket);
    var loop = device.StartServiceLoop();
    r["connect_ms"] = WaitSysfs(0, connected: true).ToString(CultureInfo.InvariantCulture);
    r["sysfs_lbs"] = NbdSysfs.Read(0).LogicalBlockSize.ToString(CultureInfo.InvariantCulture);
    r["backing"] = WriteAndCheck("/dev/nbd0", 1 << 20, 1 << 20);
    loop.Stop();
    var result = await loop.Completion.WaitAsync(TimeSpan.FromSeconds(15));
    r["stopped_by_request"] = result.StoppedByRequest.ToString();
    r["errno"] = result.ErrnoName ?? "0";
    device.Dispose();
    r["free_ms"] = WaitSysfs(0, connected: false).ToString(CultureInfo.InvariantCulture);
    socket.Dispose();
});

await Step("ioctl-no-socket", r =>
{
    using var device = NbdDevice.Open("/dev/nbd1");
    var result = device.RunServiceLoop();
    r["errno"] = result.ErrnoName ?? "0";
    return Task.CompletedTask;
});

await Step("ioctl-socket-death", async r =>
{
    var (socket, size, flags) = Handshake();
    using var device = NbdDevice.Open("/dev/nbd3");
    device.SetSizeBytes(size);
    device.SetFlags(flags);
    device.SetSocket(socket);
    var loop = device.StartServiceLoop();
    WaitSysfs(3, connected: true);
    var sw = Stopwatch.StartNew();
    socket.Shutdown(SocketShutdown.Both); // the kernel uses the same struct socket: its receive thread sees EOF
    var result = await loop.Completion.WaitAsync(TimeSpan.FromSeconds(15));
    r["return_ms"] = sw.ElapsedMilliseconds.ToString(CultureInfo.InvariantCulture);
    r["stopped_by_request"] = result.StoppedByRequest.ToString();
    r["errno"] = result.ErrnoName ?? "0";
    device.Dispose();
    r["free_ms"] = WaitSysfs(3, connected: false).ToString(CultureInfo.InvariantCulture);
    socket.Dispose();
});

await Step("ioctl-setsock-other-thread", r =>
{
    var (s1, _, _) = Handshake();
    var (s2, _, _) = Handshake();
    var (s3, _, _) = Handshake();
    using var device = NbdDevice.Open("/dev/nbd2");
    // Thread A stays alive while B tries: the driver compares task_struct pointers, and a new thread may reuse an
    // exited thread's task_struct (seen once: B succeeded after A had exited).
    using var aDone = new ManualResetEventSlim();
    using var aMayExit = new ManualResetEventSlim();
    var threadA = new Thread(() => { device.SetSocket(s1); aDone.Set(); aMayExit.Wait(); });
    threadA.Start();
    aDone.Wait();
    r["first_thread_a"] = "ok";
    r["second_thread_b"] = Outcome(() => RunOnThread(() => device.SetSocket(s2)));
    aMayExit.Set();
    threadA.Join();
    r["same_thread_again"] = Outcome(() => device.SetSocket(s3)); // the test thread is not thread A either
    r["ioctl_clear_sock"] = Outcome(device.ClearSocket);
    device.Dispose();
    r["free_ms"] = WaitSysfs(2, connected: false).ToString(CultureInfo.InvariantCulture);
    s1.Dispose(); s2.Dispose(); s3.Dispose();
    return Task.CompletedTask;
});

await Step("ioctl-multi-conn", async r =>
{
    var (s1, size, flags) = Handshake();
    var (s2, _, _) = Handshake();
    r["can_multi_conn"] = ((flags & 0x100) != 0).ToString();
    using var device = NbdDevice.Open("/dev/nbd4");
    device.SetSizeBytes(size);
    device.SetFlags(flags);
    await Task.Yield(); // continue on a thread-pool thread: SetSockets sets both from there
    device.SetSockets([s1, s2]);
    var loop = device.StartServiceLoop();
    if ((flags & 0x100) != 0)
    {
        r["connect_ms"] = WaitSysfs(4, connected: true).ToString(CultureInfo.InvariantCulture);
        r["backing"] = WriteAndCheck("/dev/nbd4", 5 << 20, 4 << 20);
        loop.Stop();
    }
    var result = await loop.Completion.WaitAsync(TimeSpan.FromSeconds(15));
    r["errno"] = result.ErrnoName ?? "0";
    device.Dispose();
    r["free_ms"] = WaitSysfs(4, connected: false).ToString(CultureInfo.InvariantCulture);
    s1.Dispose(); s2.Dispose();
});

// The peek offset of a unix stream socket (SO_PEEK_OFF, asm-generic/socket.h: 42) as a consumption counter: every
// non-peek recv(2) lowers it by the bytes it consumed, in the same kernel call. On the relay's pair: our end's counter
// says how many request bytes the relay consumed, the driver's end's counter how many reply bytes the driver consumed
// (its recv_work reads with plain kernel recvmsg). A relay that knows both positions after a crash can resume exactly.
// This step serves the driver itself over a socket pair (no server): reads (partition scan, a 4 MiB read through the
// page cache), writes and an fsync, then compares both counters with what it counted itself.
await Step("peek-offset-counters", async r =>
{
    const int SolSocket = 1, SoPeekOff = 42, Start = 1 << 30;
    var (kernelEnd, ourEnd) = NbdSocketPair.Create();
    kernelEnd.SetRawSocketOption(SolSocket, SoPeekOff, BitConverter.GetBytes(Start));
    ourEnd.SetRawSocketOption(SolSocket, SoPeekOff, BitConverter.GetBytes(Start));
    long consumed = 0, replied = 0, requests = 0;
    var serve = new Thread(() =>
    {
        var header = new byte[28];
        var payload = new byte[32 << 20];
        var reply = new byte[16];
        BinaryPrimitives.WriteUInt32BigEndian(reply, 0x67446698);
        try
        {
            while (true)
            {
                Receive(ourEnd, header);
                Interlocked.Add(ref consumed, header.Length);
                ushort type = BinaryPrimitives.ReadUInt16BigEndian(header.AsSpan(6));
                ulong offset = BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(16));
                int length = (int)BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(24));
                if (type == 2) // NBD_CMD_DISC
                {
                    return;
                }
                if (type == 1) // NBD_CMD_WRITE: consume the data
                {
                    Receive(ourEnd, payload.AsSpan(0, length));
                    Interlocked.Add(ref consumed, length);
                }
                header.AsSpan(8, 8).CopyTo(reply.AsSpan(8)); // the cookie
                int data = type == 0 ? length : 0; // NBD_CMD_READ: the device offset's pattern
                for (int i = 0; i < data; i++)
                {
                    payload[i] = Pattern((long)offset + i);
                }
                ourEnd.Send(reply);
                if (data > 0)
                {
                    ourEnd.Send(payload.AsSpan(0, data));
                }
                Interlocked.Add(ref replied, reply.Length + data);
                Interlocked.Increment(ref requests);
            }
        }
        catch (Exception e) when (e is SocketException or EndOfStreamException or ObjectDisposedException)
        {
        }
    }) { IsBackground = true, Name = "probe server" };
    serve.Start();
    using var device = NbdDevice.Open("/dev/nbd3");
    device.SetBlockSize(4096);
    device.SetSizeBytes(16 << 20);
    device.SetFlags(1); // NBD_FLAG_HAS_FLAGS: no FLUSH, so the fsync below sends only writes
    device.SetTimeout(TimeSpan.FromSeconds(30));
    device.SetSocket(kernelEnd);
    var loop = device.StartServiceLoop();
    r["connect_ms"] = WaitSysfs(3, connected: true).ToString(CultureInfo.InvariantCulture);
    // What bounds a design that leaves requests unread in the socket: the largest request the driver sends by default
    // and the largest send buffer an unprivileged setsockopt(SO_SNDBUF) gets.
    r["max_sectors_kb"] = ReadSys("/sys/block/nbd3/queue/max_sectors_kb");
    r["wmem_max"] = ReadSys("/proc/sys/net/core/wmem_max");
    using (var stream = new FileStream("/dev/nbd3", FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite))
    {
        var back = new byte[4 << 20];
        stream.Position = 8 << 20;
        stream.ReadExactly(back);
        bool match = true;
        for (int i = 0; i < back.Length; i++)
        {
            match &= back[i] == Pattern((8 << 20) + i);
        }
        r["read_back"] = match ? "match" : "mismatch";
        stream.Position = 1 << 20;
        stream.Write(new byte[3 << 20]);
        stream.Flush(flushToDisk: true);
    }

    // Quiet: the driver has read every reply (nothing left on its end) and no request is being served.
    var quiet = Stopwatch.StartNew();
    long seen = -1;
    while (quiet.ElapsedMilliseconds < 10_000 && (kernelEnd.Available != 0 || Interlocked.Read(ref requests) != seen))
    {
        seen = Interlocked.Read(ref requests);
        Thread.Sleep(200);
    }
    r["requests"] = Interlocked.Read(ref requests).ToString(CultureInfo.InvariantCulture);
    r["kernel_end_unread"] = kernelEnd.Available.ToString(CultureInfo.InvariantCulture);
    r["consumed"] = Interlocked.Read(ref consumed).ToString(CultureInfo.InvariantCulture);
    r["our_counter"] = (Start - PeekOffset(ourEnd)).ToString(CultureInfo.InvariantCulture);
    r["replied"] = Interlocked.Read(ref replied).ToString(CultureInfo.InvariantCulture);
    r["kernel_counter"] = (Start - PeekOffset(kernelEnd)).ToString(CultureInfo.InvariantCulture);
    loop.Stop();
    r["errno"] = (await loop.Completion.WaitAsync(TimeSpan.FromSeconds(15))).ErrnoName ?? "0";
    device.Dispose();
    r["free_ms"] = WaitSysfs(3, connected: false).ToString(CultureInfo.InvariantCulture);
    ourEnd.Dispose();
    serve.Join(5000);
    kernelEnd.Dispose();

    static byte Pattern(long position) => (byte)((position * 2654435761L) >> 13);
    static int PeekOffset(Socket socket)
    {
        var value = new byte[4];
        socket.GetRawSocketOption(SolSocket, SoPeekOff, value);
        return BitConverter.ToInt32(value);
    }
});

await Step("open-unused", async r =>
{
    // nbd0 busy (connected, NBD_DO_IT running): the search must skip it.
    var (socket, size, flags) = Handshake();
    using var busy = NbdDevice.Open("/dev/nbd0");
    busy.SetSizeBytes(size);
    busy.SetFlags(flags);
    busy.SetSocket(socket);
    var loop = busy.StartServiceLoop();
    r["nbd0_connect_ms"] = WaitSysfs(0, connected: true).ToString(CultureInfo.InvariantCulture);
    using (var device = NbdDevice.OpenUnused())
    {
        r["path"] = device.Path;
        r["picked_size"] = NbdSysfs.Read(device.Index).SizeBytes.ToString(CultureInfo.InvariantCulture);
    }
    loop.Stop();
    await loop.Completion.WaitAsync(TimeSpan.FromSeconds(15));
    busy.Dispose();
    r["free_ms"] = WaitSysfs(0, connected: false).ToString(CultureInfo.InvariantCulture);
    socket.Dispose();
});

await Step("netlink", async r =>
{
    using var netlink = NbdNetlink.Open();
    r["family_id"] = netlink.FamilyId.ToString(CultureInfo.InvariantCulture);
    var all = netlink.Status();
    r["status_devices"] = all.Count.ToString(CultureInfo.InvariantCulture);
    r["status_connected"] = all.Count(s => s.Connected).ToString(CultureInfo.InvariantCulture);
    using var events = NbdNetlinkEvents.Subscribe();

    var (socket, size, flags) = Handshake();
    int index = netlink.Connect(new NbdNetlinkConnectRequest
    {
        SizeBytes = size, BlockSize = 4096, ServerFlags = flags, Sockets = [socket], BackendIdentifier = "probe-nl",
        Timeout = TimeSpan.FromSeconds(30), DeadConnectionTimeout = TimeSpan.FromSeconds(30),
    });
    r["index"] = index.ToString(CultureInfo.InvariantCulture);
    var status = NbdSysfs.Read(index);
    r["sysfs_connected"] = status.IsConnected.ToString();
    r["sysfs_backend"] = status.Backend ?? "none";
    r["sysfs_lbs"] = status.LogicalBlockSize.ToString(CultureInfo.InvariantCulture);
    r["sysfs_size"] = status.SizeBytes.ToString(CultureInfo.InvariantCulture);
    r["status_one"] = string.Join(",", netlink.Status(index).Select(s => $"{s.Index}:{s.Connected}"));
    r["backing1"] = WriteAndCheck($"/dev/nbd{index}", 2 << 20, 1 << 20);

    var (busySocket, _, _) = Handshake();
    r["connect_same_index"] = Outcome(() => netlink.Connect(new NbdNetlinkConnectRequest { Index = index, SizeBytes = size, Sockets = [busySocket] }));
    using (var ioctlOnNetlink = NbdDevice.Open($"/dev/nbd{index}"))
    {
        r["ioctl_set_flags_on_netlink_dev"] = Outcome(() => ioctlOnNetlink.SetFlags(flags));
    }

    var wait = events.WaitForLinkDeadAsync(new CancellationTokenSource(TimeSpan.FromSeconds(20)).Token);
    var sw = Stopwatch.StartNew();
    socket.Shutdown(SocketShutdown.Both);
    try
    {
        r["link_dead_index"] = (await wait).ToString(CultureInfo.InvariantCulture);
        r["link_dead_ms"] = sw.ElapsedMilliseconds.ToString(CultureInfo.InvariantCulture);
    }
    catch (OperationCanceledException)
    {
        r["link_dead_index"] = "timeout";
    }
    r["sysfs_connected_after_death"] = NbdSysfs.Read(index).IsConnected.ToString();

    var (socket2, _, _) = Handshake();
    r["reconfigure_without_backend"] = Outcome(() => netlink.Reconfigure(new NbdNetlinkReconfigureRequest { Index = index, Sockets = [socket2] }));
    r["reconfigure"] = Outcome(() => netlink.Reconfigure(new NbdNetlinkReconfigureRequest { Index = index, Sockets = [socket2], BackendIdentifier = "probe-nl" }));
    r["sysfs_connected_after_reconfigure"] = NbdSysfs.Read(index).IsConnected.ToString();
    r["backing2"] = WriteAndCheck($"/dev/nbd{index}", 3 << 20, 1 << 20);
    r["readback2"] = ReadBack($"/dev/nbd{index}", 40 << 20, 1 << 20);
    var (socket3, _, _) = Handshake();
    r["reconfigure_no_dead_slot"] = Outcome(() => netlink.Reconfigure(new NbdNetlinkReconfigureRequest { Index = index, Sockets = [socket3], BackendIdentifier = "probe-nl" }));
    r["backing3"] = WriteAndCheck($"/dev/nbd{index}", 4 << 20, 1 << 20);
    r["reconfigure_wrong_backend"] = Outcome(() => netlink.Reconfigure(new NbdNetlinkReconfigureRequest { Index = index, BackendIdentifier = "other" }));
    r["reconfigure_unknown_index"] = Outcome(() => netlink.Reconfigure(new NbdNetlinkReconfigureRequest { Index = 999 }));

    netlink.Disconnect(index);
    r["free_ms"] = WaitSysfs(index, connected: false).ToString(CultureInfo.InvariantCulture);
    r["status_after"] = string.Join(",", netlink.Status(index).Select(s => $"{s.Index}:{s.Connected}"));
    r["disconnect_again"] = Outcome(() => netlink.Disconnect(index));
    socket.Dispose(); socket2.Dispose(); socket3.Dispose(); busySocket.Dispose();
});

await Step("netlink-destroy", r =>
{
    using var netlink = NbdNetlink.Open();
    var (socket, size, flags) = Handshake();
    int index = netlink.Connect(new NbdNetlinkConnectRequest
    {
        Index = 20, SizeBytes = size, ServerFlags = flags, Sockets = [socket], ClientFlags = NbdClientFlags.DestroyOnDisconnect,
    });
    r["index"] = index.ToString(CultureInfo.InvariantCulture);
    r["created"] = Directory.Exists($"/sys/block/nbd{index}").ToString();
    r["listed"] = NbdSysfs.ListDevices().Contains(index).ToString();
    netlink.Disconnect(index);
    var sw = Stopwatch.StartNew();
    while (Directory.Exists($"/sys/block/nbd{index}") && sw.ElapsedMilliseconds < 5000)
    {
        Thread.Sleep(20);
    }
    r["removed"] = (!Directory.Exists($"/sys/block/nbd{index}")).ToString();
    socket.Dispose();
    return Task.CompletedTask;
});

static async Task Step(string name, Func<Dictionary<string, string>, Task> body)
{
    var fields = new Dictionary<string, string>();
    try
    {
        await body(fields);
    }
    catch (Exception ex)
    {
        fields["error"] = ex.GetType().Name + ":" + ex.Message.Replace(' ', '_');
    }
    Console.WriteLine($"RESULT probe-{name} " + string.Join(' ', fields.Select(kv => $"{kv.Key}={kv.Value.Replace(' ', '_')}")));
}

// Expects the library to refuse before any ioctl: ArgumentException naming the socket kind.
static string Refusal(Action action)
{
    try
    {
        action();
        return "accepted";
    }
    catch (ArgumentException ex)
    {
        var says = ex.Message.Contains("stream", StringComparison.Ordinal) ? "stream" : ex.Message.Contains("connected", StringComparison.Ordinal) ? "connected" : "other";
        return $"ArgumentException:{says}";
    }
    catch (Exception ex)
    {
        return ex.GetType().Name;
    }
}

static string ReadSys(string path)
{
    try
    {
        return File.ReadAllText(path).Trim().Replace(' ', '_');
    }
    catch (IOException)
    {
        return "absent";
    }
}

// Writes random bytes into nbd-server's backing file behind the device's back and reads them through the device:
// the range was never touched through the device, so no page cache can answer; the server must.
static string ReadBack(string device, long offset, int length)
{
    var data = new byte[length];
    Random.Shared.NextBytes(data);
    using (var backing = new FileStream(Backing, FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
    {
        backing.Position = offset;
        backing.Write(data);
        backing.Flush(flushToDisk: true);
    }
    using var stream = new FileStream(device, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
    stream.Position = offset;
    var back = new byte[length];
    stream.ReadExactly(back);
    return back.AsSpan().SequenceEqual(data) ? "match" : "mismatch";
}

static string Outcome(Action action)
{
    try
    {
        action();
        return "ok";
    }
    catch (NbdKernelException ex)
    {
        return ex.ErrnoName;
    }
    catch (Exception ex)
    {
        return ex.GetType().Name;
    }
}

static void RunOnThread(Action action)
{
    Exception? error = null;
    var thread = new Thread(() => { try { action(); } catch (Exception ex) { error = ex; } });
    thread.Start();
    thread.Join();
    if (error is not null)
    {
        throw error;
    }
}

static long WaitSysfs(int index, bool connected)
{
    var sw = Stopwatch.StartNew();
    while (sw.ElapsedMilliseconds < 10_000)
    {
        var status = NbdSysfs.Read(index);
        if (connected ? status.IsConnected && status.SizeBytes > 0 : !status.IsConnected && status.SizeBytes == 0)
        {
            return sw.ElapsedMilliseconds;
        }
        Thread.Sleep(20);
    }
    return -1;
}

// Writes random bytes through the block device, fsyncs, and compares with nbd-server's backing file.
static string WriteAndCheck(string device, long offset, int length)
{
    var data = new byte[length];
    Random.Shared.NextBytes(data); // not RandomNumberGenerator: the VM has no libssl
    using (var stream = new FileStream(device, FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
    {
        stream.Position = offset;
        stream.Write(data);
        stream.Flush(flushToDisk: true);
    }
    using var backing = new FileStream(Backing, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
    backing.Position = offset;
    var back = new byte[length];
    backing.ReadExactly(back);
    return back.AsSpan().SequenceEqual(data) ? "match" : "mismatch";
}

// Minimal fixed-newstyle handshake with NBD_OPT_EXPORT_NAME (doc/proto.md "Newstyle negotiation").
static (Socket Socket, ulong Size, ushort Flags) Handshake(string export = "probe")
{
    var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
    socket.Connect(new IPEndPoint(IPAddress.Loopback, Port));
    Span<byte> hello = stackalloc byte[18];
    Receive(socket, hello);
    if (BinaryPrimitives.ReadUInt64BigEndian(hello) != 0x4e42444d41474943 || BinaryPrimitives.ReadUInt64BigEndian(hello[8..]) != 0x49484156454F5054)
    {
        throw new InvalidOperationException("not a newstyle NBD server");
    }
    ushort serverFlags = BinaryPrimitives.ReadUInt16BigEndian(hello[16..]);
    uint clientFlags = serverFlags & 3u; // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    var name = System.Text.Encoding.ASCII.GetBytes(export);
    var request = new byte[4 + 8 + 4 + 4 + name.Length];
    BinaryPrimitives.WriteUInt32BigEndian(request, clientFlags);
    BinaryPrimitives.WriteUInt64BigEndian(request.AsSpan(4), 0x49484156454F5054);
    BinaryPrimitives.WriteUInt32BigEndian(request.AsSpan(12), 1); // NBD_OPT_EXPORT_NAME
    BinaryPrimitives.WriteUInt32BigEndian(request.AsSpan(16), (uint)name.Length);
    name.CopyTo(request, 20);
    socket.Send(request);
    var reply = new byte[10 + ((clientFlags & 2) != 0 ? 0 : 124)];
    Receive(socket, reply);
    return (socket, BinaryPrimitives.ReadUInt64BigEndian(reply), BinaryPrimitives.ReadUInt16BigEndian(reply.AsSpan(8)));
}

static void Receive(Socket socket, Span<byte> buffer)
{
    while (!buffer.IsEmpty)
    {
        int n = socket.Receive(buffer);
        if (n == 0)
        {
            throw new EndOfStreamException("server closed during handshake");
        }
        buffer = buffer[n..];
    }
}

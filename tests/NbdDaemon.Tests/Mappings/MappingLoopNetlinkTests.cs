using Nbd.Protocol;
using Microsoft.Extensions.Logging;
using NbdDaemon.Configuration;
using NbdDaemon.Mappings;

namespace NbdDaemon.Tests.Mappings;

/// <summary>Netlink reconnect while the kernel holds I/O, socket hand-over confirmation, adoption, OnStop.</summary>
public sealed class MappingLoopNetlinkTests
{
    private readonly ArmedTimeProvider _time = new();
    private readonly FakeKernel _kernel = new();

    [Fact]
    public async Task RunAsync_LinkDeadThenServerDown_RetriesEvery250msWhileHeldThenBacksOff()
    {
        var connector = new FakeConnector().ThenServe().ThenRefuse();
        var options = TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, reconnect: ReconnectOptions.Default with { MaxAttempts = 3 })
            with { DeadConnectionTimeout = TimeSpan.FromSeconds(2) };
        // Random 0.5 → no jitter: exactly 250 ms while held, exponential base × 0.75 afterwards.
        MappingLoop loop = TestMappings.Loop(options, connector, _kernel, _time, () => 0.5);
        var delays = new List<double>();
        // Read on the loop's flow: a zero delay lets the loop run on before the test could read LastDelay.
        await using var running = RunningLoop.Start(loop, state =>
        {
            if (state == MappingState.Reconnecting)
            {
                lock (delays)
                {
                    delays.Add(loop.LastDelay!.Value.TotalMilliseconds);
                }
            }
        });
        await running.WaitForAsync(MappingState.Serving);

        _kernel.Netlink!.RaiseLinkDead();
        for (int seen = 1; seen <= 11; seen++)
        {
            await running.WaitForAsync(MappingState.Reconnecting, seen);
            lock (delays)
            {
                _time.Advance(TimeSpan.FromMilliseconds(delays[seen - 1]));
            }
        }

        await running.EndedAsync();

        // 0 (LINK_DEAD itself), then 250 ms until 2 s since the loss, then 1 s · 0.75, 2 s · 0.75 as for any other
        // failure; the fast retries did not count towards MaxAttempts=3 (gave up at the third slow failure).
        Assert.Equal([0, 250, 250, 250, 250, 250, 250, 250, 250, 750, 1500], delays);
        Assert.Equal(MappingState.GaveUp, loop.State);
        Assert.Equal(12, connector.Calls);
    }

    [Fact]
    public async Task RunAsync_HeldRetryDelay_Jitters20Percent()
    {
        var connector = new FakeConnector().ThenServe().ThenRefuse();
        var random = new Queue<double>([0.0, 1.0]);
        MappingLoop loop = TestMappings.Loop(
            TestMappings.Create(kernelInterface: KernelInterface.Netlink), connector, _kernel, _time, () => random.Count > 0 ? random.Dequeue() : 0.5);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        _kernel.Netlink!.RaiseLinkDead();
        await running.WaitForAsync(MappingState.Reconnecting, 2);
        Assert.Equal(200, loop.LastDelay!.Value.TotalMilliseconds);
        _time.Advance(loop.LastDelay.Value);
        await running.WaitForAsync(MappingState.Reconnecting, 3);
        Assert.Equal(300, loop.LastDelay!.Value.TotalMilliseconds);

        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_ExportChangedWhileHeld_KeepsNormalSchedule()
    {
        var connector = new FakeConnector().ThenServe().ThenServe(FakeConnector.DefaultExport with { Size = 1UL << 31 });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        _kernel.Netlink!.RaiseLinkDead();
        await running.WaitForAsync(MappingState.Reconnecting, 2);

        Assert.Equal(TimeSpan.FromSeconds(1), loop.LastDelay);
        Assert.Equal("export size changed from 1073741824 to 2147483648 bytes", loop.LastFailure);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_NoDeviceConfigured_SessionsLearnTheDeviceConnectAssigned()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        Assert.Equal("/dev/nbd5", loop.Device);
        Assert.Equal("/dev/nbd5", Assert.Single(connector.Sessions).Served);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_ExportLostTrimAfterLinkDead_RefusedWithoutReconfigure()
    {
        // RECONFIGURE keeps CONNECT's flags: the driver would go on sending TRIM to a server that no longer offers it.
        const ushort flush = (ushort)TransmissionFlags.SendFlush, trim = (ushort)TransmissionFlags.SendTrim;
        ExportDescription before = FakeConnector.DefaultExport with { TransmissionFlags = (ushort)(FakeConnector.DefaultExport.TransmissionFlags | flush | trim) };
        var connector = new FakeConnector().ThenServe(before).ThenServe(before with { TransmissionFlags = (ushort)(before.TransmissionFlags & ~trim) });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        _kernel.Netlink!.RaiseLinkDead();
        await running.WaitForAsync(MappingState.Reconnecting, 2);

        Assert.Equal("export no longer offers NBD_FLAG_SEND_TRIM, which the kernel was configured to send", loop.LastFailure);
        Assert.Equal(TimeSpan.FromSeconds(1), loop.LastDelay);
        Assert.DoesNotContain(_kernel.Operations, o => o.StartsWith("nl-reconfigure", StringComparison.Ordinal));
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_TwoConnectionsOneSlotDies_ShutsDownBothAndRefillsSlotMarkedDeadLater()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, connections: 2), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        FakeSession[] old = [.. connector.Sessions];

        _kernel.Netlink!.RaiseLinkDead(0);
        // Slot 1 is still alive at the first RECONFIGURE (the kernel notices the shut-down socket a moment later).
        await TestMappings.WaitUntilAsync(() => _kernel.Operations.Contains("nl-reconfigure 5 socks 2 id nbd-daemon:data") && _time.Armed(MappingLoop.HeldRetryInterval) == 1);

        Assert.All(old, s => Assert.True(s.ShutDown));
        Assert.All(old, s => Assert.True(s.Disposed));
        Assert.Equal(MappingState.ConfiguringKernel, loop.State);
        _kernel.NetlinkDevices[5].MarkDead(1);
        _time.Advance(MappingLoop.HeldRetryInterval);
        await running.WaitForAsync(MappingState.Serving, 2);

        Assert.Equal(["nl-reconfigure 5 socks 2 id nbd-daemon:data", "nl-reconfigure 5 socks 1 id nbd-daemon:data"], _kernel.Operations.Skip(3));
        Assert.All(connector.Sessions.Skip(2), s => Assert.Equal(TimeSpan.FromSeconds(30), _kernel.ReadSendTimeout(s.Socket)));
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_TwoConnectionsOneSlotStaysAlive_ServesOnTheTakenSocketAndClosesTheOther()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, connections: 2), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        _kernel.Netlink!.RaiseLinkDead(0);
        for (int i = 1; i <= MappingLoop.ReconfigureRetries; i++)
        {
            await TestMappings.WaitUntilAsync(() => _kernel.Operations.Count(o => o.StartsWith("nl-reconfigure", StringComparison.Ordinal)) == i && _time.Armed(MappingLoop.HeldRetryInterval) == i);
            _time.Advance(MappingLoop.HeldRetryInterval);
        }

        await running.WaitForAsync(MappingState.Serving, 2);

        FakeSession[] fresh = [.. connector.Sessions.Skip(2)];
        Assert.Equal(TimeSpan.FromSeconds(30), _kernel.ReadSendTimeout(fresh[0].Socket));
        Assert.False(fresh[0].Disposed);
        Assert.True(fresh[1].Disposed);
        Assert.Equal(["nl-reconfigure 5 socks 2 id nbd-daemon:data", .. Enumerable.Repeat("nl-reconfigure 5 socks 1 id nbd-daemon:data", 4)], _kernel.Operations.Skip(3));
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_ReconfigureTakesNoSocket_RetriesFourTimesThenFailsTransient()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        // The connection ends, but the kernel never marks its slot dead: it keeps dropping the new socket.
        _kernel.EndSocket(connector.Sessions.Single().Socket);
        for (int i = 1; i <= MappingLoop.ReconfigureRetries; i++)
        {
            await TestMappings.WaitUntilAsync(() => _kernel.Operations.Count(o => o.StartsWith("nl-reconfigure", StringComparison.Ordinal)) == i && _time.Armed(MappingLoop.HeldRetryInterval) == i);
            _time.Advance(MappingLoop.HeldRetryInterval);
        }

        await running.WaitForAsync(MappingState.Reconnecting, 2);

        Assert.Equal(5, _kernel.Operations.Count(o => o.StartsWith("nl-reconfigure", StringComparison.Ordinal)));
        Assert.Equal("kernel took 0 of 1 sockets on RECONFIGURE: no dead connection slot after 5 tries over 1 s", loop.LastFailure);
        Assert.Equal(TimeSpan.FromMilliseconds(300), loop.LastDelay);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_DeviceLeftWithDeadSlot_AdoptsByReconfigureWithoutConnect()
    {
        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, "nbd-daemon:data", deadSlots: 1);
        _kernel.SysfsOnly[0] = new KernelDeviceInfo(0, FakeConnector.DefaultExport.Size, 4096, "nbd-daemon:other", true, false);
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        Assert.Equal("/dev/nbd2", loop.Device);
        // Adoption applies the mapping's Timeout (the previous process may have raised it for a hand-over).
        Assert.Equal(["netlink open", "nl-reconfigure 2 socks 1 id nbd-daemon:data", "nl-timeout 2 30 s id nbd-daemon:data"], _kernel.Operations);
        FakeSession session = connector.Sessions.Single();
        Assert.False(session.Disposed);
        Assert.Equal(TimeSpan.FromSeconds(30), _kernel.ReadSendTimeout(session.Socket));

        // From now on it is our device: a later loss reconfigures the same index.
        _kernel.Netlink!.RaiseLinkDead();
        await running.WaitForAsync(MappingState.Serving, 2);
        Assert.Equal("nl-reconfigure 2 socks 1 id nbd-daemon:data", _kernel.Operations[^1]);
        await running.StopAsync();
        Assert.Contains("nl-disconnect 2", _kernel.Operations);
    }

    /// <summary>
    /// The device was freed and taken by another client while this mapping could not reach its server: the kernel does
    /// not ask who disconnects, and the stop tore the other client's device down under its user.
    /// </summary>
    [Fact]
    public async Task RunAsync_StopAfterAnotherClientTookTheDevice_NotDisconnected()
    {
        var connector = new FakeConnector().ThenServe();
        var logger = new ListLogger();
        var loop = new MappingLoop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: "/dev/nbd2"), connector, _kernel, _time, logger, () => 1.0);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, "qemu-nbd"); // theirs now
        await running.StopAsync();

        Assert.DoesNotContain(_kernel.Operations, o => o.StartsWith("nl-disconnect", StringComparison.Ordinal));
        Assert.Contains(logger.Records, r => r.Message == "Mapping data: /dev/nbd2 is another client's now (backend qemu-nbd, not ours): not disconnected");
    }

    [Fact]
    public async Task RunAsync_DeviceLeftAndServerDown_RetriesOnTheHeldScheduleFromTheStart()
    {
        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, "nbd-daemon:data", deadSlots: 1);
        var connector = new FakeConnector().ThenRefuse().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time, () => 0.5);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Reconnecting);

        // The kernel may be holding the device's I/O since the connection died with no daemon running.
        Assert.Equal(MappingLoop.HeldRetryInterval, loop.LastDelay);
        _time.Advance(MappingLoop.HeldRetryInterval);
        await running.WaitForAsync(MappingState.Serving);
        // Adoption applies the mapping's Timeout (the previous process may have raised it for a hand-over).
        Assert.Equal(["netlink open", "nl-reconfigure 2 socks 1 id nbd-daemon:data", "nl-timeout 2 30 s id nbd-daemon:data"], _kernel.Operations);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_NoDeviceLeftAndServerDown_NormalBackoffAtStart()
    {
        var connector = new FakeConnector().ThenRefuse();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time, () => 0.5);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Reconnecting);

        Assert.Equal(TimeSpan.FromMilliseconds(750), loop.LastDelay);
        await running.StopAsync();
    }

    /// <summary>
    /// The kernel gave the device up during a long outage and another client connected it without a backend identifier
    /// (RECONFIGURE then checks nothing): our sockets went into its dead slots, and its reads came from our server.
    /// </summary>
    [Fact]
    public async Task RunAsync_KeptDeviceTakenByAnotherClientDuringTheOutage_NotReconfiguredConnectsAfresh()
    {
        var connector = new FakeConnector().ThenServe();
        var logger = new ListLogger();
        var loop = new MappingLoop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time, logger, () => 1.0);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        Assert.Equal("/dev/nbd5", loop.Device);

        _kernel.NetlinkDevices.TryRemove(5, out _); // given up by the kernel
        _kernel.LeaveDevice(5, FakeConnector.DefaultExport.Size, backend: null, deadSlots: 1); // nbd-client's, one dead slot
        _kernel.Netlink!.RaiseLinkDeadEventOnly();
        _kernel.EndSocket(connector.Sessions.Single().Socket);
        await running.WaitForAsync(MappingState.Serving, 2);

        Assert.DoesNotContain(_kernel.Operations, o => o.StartsWith("nl-reconfigure 5", StringComparison.Ordinal));
        Assert.Equal("nl-connect 6 size 1073741824 socks 1 id nbd-daemon:data", _kernel.Operations[^1]);
        Assert.Equal("/dev/nbd6", loop.Device);
        Assert.True(_kernel.NetlinkDevices[5].Dead[0]);
        Assert.Contains(logger.Records, r => r.Message == "Mapping data: /dev/nbd5 is another client's now (backend none, not ours): the kernel gave it up during the outage; not reconnecting it, connecting a device afresh");

        await running.StopAsync();
        Assert.DoesNotContain("nl-disconnect 5", _kernel.Operations);
        Assert.Contains("nl-disconnect 6", _kernel.Operations);
    }

    /// <summary>The same with the device named in the configuration: CONNECT is refused (EBUSY) until it is free again.</summary>
    [Fact]
    public async Task RunAsync_ConfiguredDeviceTakenByAnotherClientDuringTheOutage_NotReconfiguredNorLimited()
    {
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { MaximumPayload = 65536 });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: "/dev/nbd2"), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        _kernel.NetlinkDevices.TryRemove(2, out _);
        _kernel.MaxSectorsKb[2] = 128; // restored by the kernel's new user, say
        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, backend: null, deadSlots: 1);
        int before = _kernel.Operations.Count;

        _kernel.Netlink!.RaiseLinkDeadEventOnly();
        _kernel.EndSocket(connector.Sessions.Single().Socket);
        await running.WaitForAsync(MappingState.Reconnecting, 2); // the loss, then the refused CONNECT

        string[] after = [.. _kernel.Operations.Skip(before)];
        Assert.DoesNotContain(after, o => o.StartsWith("nl-reconfigure", StringComparison.Ordinal) || o.StartsWith("limit-request", StringComparison.Ordinal));
        Assert.Contains("nl-connect 2 size 1073741824 socks 1 id nbd-daemon:data", after);
        Assert.Contains("EBUSY", loop.LastFailure, StringComparison.Ordinal);
        Assert.Equal(128u, _kernel.MaxSectorsKb[2]);
        await running.StopAsync();
        Assert.DoesNotContain("nl-disconnect 2", _kernel.Operations.Skip(before));
    }

    /// <summary>A device that looked free but was opened elsewhere: CONNECT refused, and the limit written for it put back.</summary>
    [Fact]
    public async Task RunAsync_ConnectRefusedEbusy_RequestSizeLimitWrittenBeforeItPutBack()
    {
        _kernel.SysfsOnly[2] = new KernelDeviceInfo(2, 0, 512, null, Connected: false, ReadOnly: false);
        _kernel.OpenedElsewhere.Add(2);
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { MaximumPayload = 65536 });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: "/dev/nbd2"), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Reconnecting);

        Assert.Equal(["netlink open", "limit-request 2 65536", "nl-connect 2 size 1073741824 socks 1 id nbd-daemon:data", "restore-request 2 64 128"], _kernel.Operations);
        Assert.Equal(128u, _kernel.MaxSectorsKb[2]);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_DeviceLeftStillConnected_ClosesFreshSocketsAndServesUntilLinkDead()
    {
        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, "nbd-daemon:data", deadSlots: 0);
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: "/dev/nbd2"), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        FakeSession fresh = connector.Sessions.Single();
        Assert.True(fresh.Disposed);
        Assert.False(fresh.ShutDown);
        Assert.Equal(TimeSpan.Zero, _kernel.ReadSendTimeout(fresh.Socket));
        Assert.Equal("/dev/nbd2", loop.Device);

        _kernel.Netlink!.RaiseLinkDead();
        await running.WaitForAsync(MappingState.Serving, 2);
        Assert.Equal(TimeSpan.FromSeconds(30), _kernel.ReadSendTimeout(connector.Sessions.Last().Socket));
        Assert.DoesNotContain(_kernel.Operations, o => o.StartsWith("nl-connect", StringComparison.Ordinal));
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_DeviceLeftWithOtherSize_RefusesLeavesDeviceUntouchedRetriesWithBackoff()
    {
        _kernel.LeaveDevice(2, 1UL << 29, "nbd-daemon:data", deadSlots: 1);
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Reconnecting);

        Assert.Equal("export is 1073741824 bytes but /dev/nbd2 (left configured by an earlier daemon) is 536870912 bytes; not adopting it, device left untouched", loop.LastFailure);
        Assert.Equal(TimeSpan.FromSeconds(1), loop.LastDelay);
        Assert.True(connector.Sessions.Single().Disposed);
        _time.Advance(TimeSpan.FromSeconds(1));
        await running.WaitForAsync(MappingState.Reconnecting, 2);
        Assert.Equal(TimeSpan.FromSeconds(2), loop.LastDelay);

        await running.StopAsync();
        Assert.Equal(["netlink open", "netlink close"], _kernel.Operations);
        Assert.True(_kernel.NetlinkDevices[2].Dead[0]);
        Assert.Equal(1UL << 29, _kernel.NetlinkDevices[2].Sysfs.SizeBytes);
    }

    [Theory]
    [InlineData(1073741824UL + 100, 512u, true)]
    [InlineData(1073741824UL + 100, 4096u, true)]
    [InlineData(1073741824UL + 4096, 4096u, false)]
    public async Task RunAsync_AdoptionSizeCheck_ComparesAtLogicalBlockSize(ulong exportSize, uint logicalBlockSize, bool adopted)
    {
        // sysfs size is whole 512-byte sectors: an export of 1 GiB + 100 bytes shows as 1 GiB.
        _kernel.LeaveDevice(2, 1UL << 30, "nbd-daemon:data", deadSlots: 1, logicalBlockSize: logicalBlockSize);
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { Size = exportSize });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(s => s.Contains(MappingState.Serving) || s.Contains(MappingState.Reconnecting), "Serving or Reconnecting");

        Assert.Equal(adopted ? MappingState.Serving : MappingState.Reconnecting, loop.State);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_DeviceLeftWritableButExportReadOnly_Refused()
    {
        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, "nbd-daemon:data", deadSlots: 1);
        var connector = new FakeConnector().ThenServe(FakeConnector.DefaultExport with { TransmissionFlags = ExportDescription.FlagHasFlags | ExportDescription.FlagReadOnly });
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Reconnecting);

        Assert.Equal("export is read-only but /dev/nbd2 (left configured by an earlier daemon) is writable; not adopting it, device left untouched", loop.LastFailure);
        await running.StopAsync();
    }

    /// <summary>
    /// The device's queue attributes say what the block layer will have the driver send; RECONFIGURE keeps them. A server
    /// restarted without FUA (or FLUSH, TRIM, WRITE_ZEROES) across a daemon restart was adopted, and the first such
    /// command failed under the filesystem. Offering more than the device sends is fine.
    /// </summary>
    [Theory]
    [InlineData(TransmissionFlags.SendFlush | TransmissionFlags.SendFua, TransmissionFlags.SendFlush, "NBD_FLAG_SEND_FUA")]
    [InlineData(TransmissionFlags.SendFlush | TransmissionFlags.SendTrim, TransmissionFlags.None, "NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_TRIM")]
    [InlineData(TransmissionFlags.SendWriteZeroes, TransmissionFlags.SendFlush | TransmissionFlags.SendTrim, "NBD_FLAG_SEND_WRITE_ZEROES")]
    [InlineData(TransmissionFlags.SendFlush, TransmissionFlags.SendFlush | TransmissionFlags.SendFua | TransmissionFlags.SendTrim, null)]
    [InlineData(TransmissionFlags.None, TransmissionFlags.SendFlush, null)]
    public async Task RunAsync_DeviceLeftSendingWhatTheExportNoLongerOffers_RefusedDeviceUntouched(TransmissionFlags sends, TransmissionFlags offered, string? lacking)
    {
        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, "nbd-daemon:data", deadSlots: 1, sends: sends);
        var export = FakeConnector.DefaultExport with { TransmissionFlags = (ushort)(FakeConnector.DefaultExport.TransmissionFlags | (ushort)offered) };
        var connector = new FakeConnector().ThenServe(export);
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(s => s.Contains(MappingState.Serving) || s.Contains(MappingState.Reconnecting), "Serving or Reconnecting");

        if (lacking is null)
        {
            Assert.Equal(MappingState.Serving, loop.State);
            Assert.Contains("nl-reconfigure 2 socks 1 id nbd-daemon:data", _kernel.Operations);
        }
        else
        {
            Assert.Equal(MappingState.Reconnecting, loop.State);
            Assert.Equal(
                $"export does not offer {lacking}, which /dev/nbd2 (left configured by an earlier daemon) sends (its queue attributes in sysfs); not adopting it, device left untouched",
                loop.LastFailure);
            Assert.Equal(["netlink open"], _kernel.Operations);
            Assert.True(_kernel.NetlinkDevices[2].Dead[0]);
        }

        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_OnlyOtherBackendsPresent_ConnectsNewDeviceAndNeverTouchesThem()
    {
        _kernel.LeaveDevice(1, FakeConnector.DefaultExport.Size, "nbd-daemon:other", deadSlots: 1);
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        Assert.Equal(["netlink open", "nl-connect 5 size 1073741824 socks 1 id nbd-daemon:data"], _kernel.Operations);
        await running.StopAsync();
        Assert.True(_kernel.NetlinkDevices[1].Dead[0]);
        Assert.DoesNotContain("nl-disconnect 1", _kernel.Operations);
    }

    /// <summary>
    /// The service's device, and its lock held by pid 4242: the loop started is a second daemon with the same
    /// configuration (started by hand). Returns once its first attempt was refused.
    /// </summary>
    private async Task<(MappingLoop Loop, RunningLoop Running, FakeConnector Connector)> StartBesideTheServiceAsync()
    {
        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, "nbd-daemon:data", deadSlots: 1);
        _kernel.Locks["nbd-daemon:data"] = 4242;
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time, () => 0.5);
        var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Reconnecting);
        return (loop, running, connector);
    }

    [Fact]
    public async Task RunAsync_AnotherProcessRunsTheMapping_TouchesNeitherServerNorDeviceAndItsStopLeavesTheDevice()
    {
        (MappingLoop loop, RunningLoop started, FakeConnector connector) = await StartBesideTheServiceAsync();
        await using RunningLoop running = started;

        Assert.Contains("another nbd-daemon process (pid 4242)", loop.LastFailure, StringComparison.Ordinal);
        // The normal backoff, not the fast schedule of a held device: that device is the other process's to reconnect.
        Assert.Equal(TimeSpan.FromMilliseconds(750), loop.LastDelay);
        Assert.Empty(connector.Sessions);
        await running.StopAsync();

        Assert.Equal(MappingState.Stopped, loop.State);
        Assert.Equal(["netlink open", "netlink close"], _kernel.Operations);
        Assert.True(_kernel.NetlinkDevices.ContainsKey(2));
        Assert.Equal(4242, _kernel.Locks["nbd-daemon:data"]);
    }

    [Fact]
    public async Task RunAsync_LockFreedByTheOtherProcess_TakesItAdoptsAndReleasesItAtTheEnd()
    {
        (MappingLoop loop, RunningLoop started, _) = await StartBesideTheServiceAsync();
        await using RunningLoop running = started;

        _kernel.Locks.TryRemove("nbd-daemon:data", out _); // that process ended
        _time.Advance(TimeSpan.FromMilliseconds(750));
        await running.WaitForAsync(MappingState.Serving);
        Assert.Equal(["netlink open", "nl-reconfigure 2 socks 1 id nbd-daemon:data", "nl-timeout 2 30 s id nbd-daemon:data"], _kernel.Operations);
        Assert.Equal(Environment.ProcessId, _kernel.Locks["nbd-daemon:data"]);

        await running.StopAsync();
        Assert.Contains("nl-disconnect 2", _kernel.Operations);
        Assert.Empty(_kernel.Locks);
        Assert.Equal(["lock refused nbd-daemon:data", "lock nbd-daemon:data", "unlock nbd-daemon:data"], _kernel.LockEvents);
    }

    [Fact]
    public async Task RunAsync_StopWithOnStopLeave_ClosesDescriptorsWithoutDisconnectOrShutdown()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, onStop: StopAction.Leave), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        await running.StopAsync();

        Assert.Equal(MappingState.Stopped, loop.State);
        Assert.Equal(["netlink open", "nl-connect 5 size 1073741824 socks 1 id nbd-daemon:data", "netlink close"], _kernel.Operations);
        FakeSession session = connector.Sessions.Single();
        Assert.True(session.Disposed);
        Assert.False(session.ShutDown);
        Assert.True(_kernel.NetlinkDevices.ContainsKey(5));
    }

    [Fact]
    public async Task RunAsync_StopWithOnStopLeave_RaisesTheTimeoutThenAsksEverySessionToHandOverBeforeClosingIt()
    {
        var connector = new FakeConnector().ThenServe(canHandOver: true, kernel: _kernel);
        var options = TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, onStop: StopAction.Leave) with { Connections = 2 };
        MappingLoop loop = TestMappings.Loop(options, connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        await running.StopAsync();

        FakeSession[] sessions = [.. connector.Sessions];
        Assert.Equal(["netlink open", "nl-connect 5 size 1073741824 socks 2 id nbd-daemon:data", "nl-timeout 5 60 s id nbd-daemon:data", "netlink close"], _kernel.Operations);
        Assert.Equal(1, sessions[0].TimeoutOpsBeforeHandOver);
        Assert.Equal([(0, true)], sessions[0].HandOvers);
        Assert.Equal([(1, true)], sessions[1].HandOvers);
        Assert.All(sessions, s => Assert.True(s.Disposed));
    }

    [Fact]
    public async Task RunAsync_ServerDropsEveryConnectionRightAfterTheHandshake_BacksOffInsteadOfATightLoop()
    {
        // Each loss is a LINK_DEAD while the kernel holds the I/O, which alone means "reconnect at once".
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop, state =>
        {
            if (state == MappingState.Serving)
            {
                _ = Task.Run(() => _kernel.Netlink!.RaiseLinkDead());
            }
        });

        // No time passes on the fake clock: only zero delays could lead further than this.
        await running.WaitForAsync(MappingState.Serving, 2);
        await running.WaitForAsync(MappingState.Reconnecting, 2);
        await Task.Delay(300);

        Assert.Equal(2, running.States.Count(s => s == MappingState.Serving));
        Assert.Equal(MappingState.Reconnecting, loop.State);
        Assert.Equal(TimeSpan.FromSeconds(1), loop.LastDelay); // InitialDelay, then doubling like failed attempts
        _time.Advance(TimeSpan.FromSeconds(1));
        await running.WaitForAsync(MappingState.Reconnecting, 3);
        Assert.Equal(TimeSpan.FromSeconds(2), loop.LastDelay);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_StopWithOnStopLeave_SlotsHandOverSideBySide()
    {
        // Each relay may wait up to its limit (5 s) for the replies it owes; four connections must not make that 20 s,
        // past the host's shutdown timeout. Not on the thread pool: with it busy (every mapping stopping at once, or a
        // loaded test run) Parallel.For ran the four one after another, and this test failed now and then.
        var connector = new FakeConnector().ThenServe(canHandOver: true, kernel: _kernel, handOverDelay: TimeSpan.FromSeconds(1));
        var options = TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, onStop: StopAction.Leave) with { Connections = 4 };
        MappingLoop loop = TestMappings.Loop(options, connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        var stopwatch = System.Diagnostics.Stopwatch.StartNew();
        await running.StopAsync();

        Assert.True(stopwatch.Elapsed < TimeSpan.FromSeconds(3), $"four 1 s hand-overs took {stopwatch.Elapsed}");
        Assert.Equal([0, 1, 2, 3], connector.Sessions.SelectMany(s => s.HandOvers).Select(h => h.Slot).Order());
        Assert.All(connector.Sessions, s => Assert.True(s.HandOvers.Single().BeforeDispose));
        Assert.All(connector.Sessions, s => Assert.False(s.HandedOverOnPoolThread));
    }

    [Theory]
    [InlineData(false, true)]
    [InlineData(true, true)]
    [InlineData(true, false)]
    public async Task RunAsync_HandOverOnlyOnAStopThatLeavesTheDevice(bool leave, bool stopRequested)
    {
        StopAction onStop = leave ? StopAction.Leave : StopAction.Disconnect;
        // Leave + stop hands over; Disconnect never; and Leave without a stop request (gave up) never either.
        var connector = new FakeConnector().ThenServe().ThenRefuse();
        var options = TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, onStop: onStop, reconnect: ReconnectOptions.Default with { Enabled = stopRequested });
        MappingLoop loop = TestMappings.Loop(options, connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        FakeSession session = connector.Sessions.Single();

        if (stopRequested)
        {
            await running.RequestStopAsync();
        }
        else
        {
            _kernel.Netlink!.RaiseLinkDead();
        }

        await running.EndedAsync();
        Assert.Equal(onStop == StopAction.Leave && stopRequested ? [(0, true)] : [], session.HandOvers);
    }

    [Fact]
    public async Task RunAsync_ResumedRelayAndOwnDeviceLeft_AdoptsWithoutOfferingItToTheKernel()
    {
        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, "nbd-daemon:data", deadSlots: 0);
        var connector = new FakeConnector().ThenResume();
        var logs = new ListLogger();
        MappingLoop loop = new(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, onStop: StopAction.Leave), connector, _kernel, _time, logs);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        FakeSession resumed = connector.Sessions.Single();
        Assert.Equal(["netlink open", "nl-timeout 2 30 s id nbd-daemon:data"], _kernel.Operations); // no CONNECT, no sockets offered
        Assert.Equal("/dev/nbd2", loop.Device);
        Assert.Equal("/dev/nbd2", resumed.Served);
        Assert.False(resumed.Disposed);
        Assert.Contains(logs.Entries, e => e.Message.StartsWith(
            "Mapping data adopted /dev/nbd2 (backend nbd-daemon:data, 1073741824 bytes) left configured by the previous process, carrying on with 1 relay connections it handed over", StringComparison.Ordinal));

        // Its end is watched like any other socket of ours: the kernel ending it is a lost connection.
        _kernel.EndSocket(resumed.Socket);
        await running.WaitForAsync(MappingState.Reconnecting);
        Assert.True(resumed.ShutDown);
        await running.StopAsync();
    }

    /// <summary>
    /// A stop (Leave) between the adoption with a resumed end and serving: the end was not relayed on, so it goes back to
    /// the store (not handed over), and adoption had already set the mapping's short Timeout: the device still gets the
    /// hand-over timeout, or requests the kernel sends during the restart would time out into a dead connection.
    /// </summary>
    [Fact]
    public async Task StopAsync_LeaveBetweenAdoptionAndServing_ResumedEndKeptAndHandOverTimeoutSet()
    {
        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, "nbd-daemon:data", deadSlots: 0);
        var connector = new FakeConnector().ThenResume();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, onStop: StopAction.Leave), connector, _kernel, _time);
        await RunStoppedAtAdoptionAsync(loop);

        FakeSession resumed = connector.Sessions.Single();
        Assert.Null(resumed.Served);
        Assert.False(resumed.ShutDown);
        Assert.True(resumed.Disposed);
        Assert.Equal(["netlink open", "nl-timeout 2 30 s id nbd-daemon:data", "nl-timeout 2 60 s id nbd-daemon:data", "netlink close"], _kernel.Operations);
    }

    /// <summary>
    /// Runs <paramref name="loop"/> with a stop requested from inside the adoption's own NBD_CMD_RECONFIGURE timeout
    /// (the mapping's 30 s), so it lands after the adoption and before Serves; waits for the loop to end.
    /// </summary>
    private async Task RunStoppedAtAdoptionAsync(MappingLoop loop)
    {
        RunningLoop? running = null;
        using var assigned = new ManualResetEventSlim();
        _kernel.OnOperation = op =>
        {
            if (op == "nl-timeout 2 30 s id nbd-daemon:data")
            {
                // The loop runs as soon as Start is called, possibly before `running` is assigned.
                Assert.True(assigned.Wait(TimeSpan.FromSeconds(10)));
                _ = running!.RequestStopAsync();
            }
        };
        await using (running = RunningLoop.Start(loop))
        {
            assigned.Set();
            await running.EndedAsync();
        }
    }

    [Fact]
    public async Task StopAsync_DisconnectBetweenAdoptionAndServing_ResumedEndShutDown()
    {
        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, "nbd-daemon:data", deadSlots: 0);
        var connector = new FakeConnector().ThenResume();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await RunStoppedAtAdoptionAsync(loop);

        // The device is disconnected: the kernel's connection on the resumed end is gone, nothing to give back.
        FakeSession resumed = connector.Sessions.Single();
        Assert.True(resumed.ShutDown);
        Assert.True(resumed.Disposed);
        Assert.Contains(_kernel.Operations, o => o.StartsWith("nl-disconnect 2", StringComparison.Ordinal));
    }

    [Fact]
    public async Task RunAsync_ResumedRelayButNoDeviceOfOurs_RefusedAndClosedThenANewConnection()
    {
        var connector = new FakeConnector().ThenResume().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time, () => 0.5);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Reconnecting);

        FakeSession resumed = connector.Sessions.Single();
        // Shut down, not merely disposed: a disposed resumed end that was never relayed on goes back to the store.
        Assert.True(resumed.ShutDown);
        Assert.True(resumed.Disposed);
        Assert.Equal("a relay connection handed over by the previous process, but no device is left configured for backend nbd-daemon:data; starting with a new connection", loop.LastFailure);
        Assert.Equal(["netlink open"], _kernel.Operations);

        _time.Advance(loop.LastDelay!.Value);
        await running.WaitForAsync(MappingState.Serving);
        Assert.Equal("nl-connect 5 size 1073741824 socks 1 id nbd-daemon:data", _kernel.Operations[^1]);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_GivesUpWithOnStopLeave_StillDisconnects()
    {
        var connector = new FakeConnector().ThenServe().ThenRefuse();
        var options = TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, onStop: StopAction.Leave, reconnect: ReconnectOptions.Default with { Enabled = false });
        MappingLoop loop = TestMappings.Loop(options, connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        _kernel.Netlink!.RaiseLinkDead();
        await running.EndedAsync();

        Assert.Equal(MappingState.GaveUp, loop.State);
        Assert.Contains("nl-disconnect 5", _kernel.Operations);
    }

    [Fact]
    public async Task RunAsync_SameFailureRepeated_LoggedAtPowersOfTwoElseDebug()
    {
        var connector = new FakeConnector().ThenRefuse();
        var logger = new ListLogger();
        var loop = new MappingLoop(TestMappings.Create(), connector, _kernel, _time, logger, () => 0.5);
        await using var running = RunningLoop.Start(loop);
        for (int seen = 1; seen <= 9; seen++)
        {
            await running.WaitForAsync(MappingState.Reconnecting, seen);
            _time.Advance(loop.LastDelay!.Value);
        }

        await running.StopAsync();

        int[] loud = [.. logger.Entries.Where(e => e.Level == LogLevel.Warning && e.Message.Contains("-> Reconnecting", StringComparison.Ordinal))
            .Select(e => int.Parse(e.Message[(e.Message.LastIndexOf("attempt ", StringComparison.Ordinal) + 8)..].Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture) - 1)];
        Assert.Equal([1, 2, 4, 8], loud);
        int all = logger.Entries.Count(e => e.Message.Contains("-> Reconnecting", StringComparison.Ordinal));
        Assert.True(all >= 9, $"{all} Reconnecting transitions");
        Assert.Equal(all - 4, logger.Entries.Count(e => e.Level == LogLevel.Debug && e.Message.Contains("-> Reconnecting", StringComparison.Ordinal)));
        // The attempt after a quiet failure is quiet too.
        Assert.Contains(logger.Entries, e => e.Level == LogLevel.Debug && e.Message.Contains("Reconnecting -> Connecting", StringComparison.Ordinal));
    }

    [Fact]
    public async Task RunAsync_FailureReasonChanges_LoggedAlways()
    {
        var connector = new FakeConnector().ThenRefuse().ThenRefuse().ThenRefuse()
            .Then(_ => Task.FromException<INbdSession>(new MappingException("server refused: NBD_REP_ERR_UNKNOWN")));
        var logger = new ListLogger();
        var loop = new MappingLoop(TestMappings.Create(), connector, _kernel, _time, logger, () => 0.5);
        await using var running = RunningLoop.Start(loop);
        for (int seen = 1; seen <= 4; seen++)
        {
            await running.WaitForAsync(MappingState.Reconnecting, seen);
            _time.Advance(loop.LastDelay!.Value);
        }

        await running.StopAsync();

        Assert.Contains(logger.Entries, e => e.Level == LogLevel.Warning && e.Message.Contains("NBD_REP_ERR_UNKNOWN; attempt 5", StringComparison.Ordinal));
        Assert.Contains(logger.Entries, e => e.Level == LogLevel.Debug && e.Message.Contains("connection refused; attempt 4", StringComparison.Ordinal));
    }

    [Fact]
    public async Task RunAsync_SocketEndsWithoutLinkDead_ReconnectsAtOnceNamingTheSocket()
    {
        var connector = new FakeConnector().ThenServe();
        var logger = new ListLogger();
        var loop = new MappingLoop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time, logger, () => 0.5);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        FakeSession first = connector.Sessions.Single();

        // The server closed; the kernel marked the slot dead, but no LINK_DEAD reached us (e.g. a lost event).
        _kernel.NetlinkDevices[5].MarkDead(0);
        _kernel.EndSocket(first.Socket, "the server closed the connection");
        await running.WaitForAsync(MappingState.Serving, 2);

        Assert.True(first.ShutDown);
        Assert.True(first.Disposed);
        Assert.Equal(TimeSpan.Zero, loop.LastDelay);
        Assert.Equal(["netlink open", "nl-connect 5 size 1073741824 socks 1 id nbd-daemon:data", "nl-reconfigure 5 socks 1 id nbd-daemon:data"], _kernel.Operations);
        Assert.Contains(logger.Entries, e => e.Message.Contains("Serving -> Reconnecting; connection lost (socket 1 of 1: the server closed the connection)", StringComparison.Ordinal));
        Assert.Equal(2, _kernel.WatchesStarted);
        Assert.Equal(1, _kernel.WatchesActive); // the first generation's watch was disposed
        await running.StopAsync();
        Assert.Equal(0, _kernel.WatchesActive);
    }

    [Fact]
    public async Task RunAsync_LinkDeadWhileEverySocketHealthy_IgnoredAfterGraceThenARealOneReconnects()
    {
        var connector = new FakeConnector().ThenServe();
        var logger = new ListLogger();
        var loop = new MappingLoop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, connections: 2), connector, _kernel, _time, logger, () => 0.5);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        // A LINK_DEAD for a slot of an earlier generation, arriving after our RECONFIGURE.
        _kernel.Netlink!.RaiseLinkDeadEventOnly();
        await TestMappings.WaitUntilAsync(() => _kernel.Operations.Contains("nl-link-dead 5") && _time.Armed(MappingLoop.LinkDeadGrace) == 1);
        _time.Advance(MappingLoop.LinkDeadGrace - TimeSpan.FromMilliseconds(1));
        await Task.Delay(50);
        Assert.DoesNotContain(logger.Entries, e => e.Message.Contains("LINK_DEAD for an earlier connection ignored", StringComparison.Ordinal));
        _time.Advance(TimeSpan.FromMilliseconds(1));
        await TestMappings.WaitUntilAsync(() => logger.Entries.Any(e => e.Message.Contains("LINK_DEAD for an earlier connection ignored: every current socket is healthy", StringComparison.Ordinal)));

        Assert.Equal(MappingState.Serving, loop.State);
        Assert.All(connector.Sessions, s => Assert.False(s.ShutDown));
        Assert.DoesNotContain(_kernel.Operations, o => o.StartsWith("nl-reconfigure", StringComparison.Ordinal));

        // The wait was re-armed: a LINK_DEAD whose slot is ours ends the connection.
        _kernel.Netlink.RaiseLinkDead(1);
        await running.WaitForAsync(MappingState.Reconnecting);
        Assert.Contains(logger.Entries, e => e.Message.Contains("connection lost (LINK_DEAD; socket 2 of 2: connection closed or shut down)", StringComparison.Ordinal));
        await running.StopAsync();
    }

    /// <summary>
    /// Adopted with one of two slots dead: the other still held the previous process's connection. When that one died
    /// too, its LINK_DEAD was taken for a stale one (our socket was healthy) and the device served on one connection
    /// for good. The slot is filled now, and the live connection is left alone.
    /// </summary>
    [Fact]
    public async Task RunAsync_PartlyAdoptedAndThePreviousConnectionDiesLater_ItsSlotFilledTheLiveOneKept()
    {
        var connector = new FakeConnector().ThenServe();
        (RunningLoop started, ListLogger logger) = await StartPartlyAdoptedAndLoseTheOtherSlotAsync(connector);
        await using RunningLoop running = started;
        await TestMappings.WaitUntilAsync(() => connector.Sessions.Count == 3 && _kernel.NetlinkDevices[2].Dead.All(d => !d));

        FakeSession[] sessions = [.. connector.Sessions];
        Assert.True(sessions[1].Disposed); // adoption: no dead slot for it
        Assert.False(sessions[0].ShutDown);
        Assert.Equal(sessions[2].Socket, _kernel.NetlinkDevices[2].Sockets[1]);
        Assert.Equal(TimeSpan.FromSeconds(30), _kernel.ReadSendTimeout(sessions[2].Socket));
        Assert.Equal(1, running.States.Count(t => t == MappingState.Serving));
        Assert.Equal("nl-reconfigure 2 socks 1 id nbd-daemon:data", _kernel.Operations[^1]);
        await TestMappings.WaitUntilAsync(() => logger.Entries.Any(e => e.Message.Contains("NBD_CMD_RECONFIGURE (dead slot filled): kernel took 1 of 1 sockets", StringComparison.Ordinal)));
        Assert.DoesNotContain(logger.Entries, e => e.Message.Contains("LINK_DEAD for an earlier connection ignored", StringComparison.Ordinal));

        // Both watched now: the filler's end is a lost connection like any other.
        _kernel.Netlink!.RaiseLinkDead(1);
        await running.WaitForAsync(MappingState.Reconnecting);
        Assert.Contains(logger.Entries, e => e.Message.Contains("connection lost (LINK_DEAD; socket 2 of 2", StringComparison.Ordinal));
        await running.StopAsync();
    }

    /// <summary>Filling the slot fails (server down): serving goes on over the live connection, with a warning.</summary>
    [Fact]
    public async Task RunAsync_PartlyServingAndFillingTheDeadSlotFails_ServesOnWarned()
    {
        var connector = new FakeConnector().ThenServe().ThenServe().ThenRefuse();
        (RunningLoop started, ListLogger logger) = await StartPartlyAdoptedAndLoseTheOtherSlotAsync(connector);
        await using RunningLoop running = started;
        await TestMappings.WaitUntilAsync(() => logger.Entries.Any(e => e.Message.Contains("a connection slot not held by this process died, and filling it failed (", StringComparison.Ordinal)));

        Assert.Equal(MappingState.Serving, running.States[^1]);
        Assert.False(connector.Sessions.First().ShutDown);
        Assert.True(_kernel.NetlinkDevices[2].Dead[1]);
        await running.StopAsync();
    }

    /// <summary>
    /// nbd2 left with two slots, the first dead: the loop (Connections 2) adopts it with one socket; then slot 1, the
    /// previous process's connection, dies, and the LINK_DEAD grace passes with our socket healthy.
    /// </summary>
    private async Task<(RunningLoop Running, ListLogger Logger)> StartPartlyAdoptedAndLoseTheOtherSlotAsync(FakeConnector connector, bool staleEventOnly = false)
    {
        _kernel.LeaveDevice(2, FakeConnector.DefaultExport.Size, "nbd-daemon:data", slots: 2, deadSlots: 1);
        var logger = new ListLogger();
        var loop = new MappingLoop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null, connections: 2), connector, _kernel, _time, logger, () => 0.5);
        var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        await PassLinkDeadGraceAsync(staleEventOnly, 1);
        return (running, logger);
    }

    /// <summary>A LINK_DEAD (slot 1 marked dead, or the event alone), and its grace passed.</summary>
    private async Task PassLinkDeadGraceAsync(bool eventOnly, int occurrence)
    {
        if (eventOnly)
        {
            _kernel.Netlink!.RaiseLinkDeadEventOnly();
        }
        else
        {
            _kernel.Netlink!.RaiseLinkDead(1);
        }

        await TestMappings.WaitUntilAsync(() => _kernel.Operations.Count(o => o == "nl-link-dead 2") == occurrence && _time.Armed(MappingLoop.LinkDeadGrace) == occurrence);
        _time.Advance(MappingLoop.LinkDeadGrace);
    }

    /// <summary>
    /// The connect for the dead slot hangs (server unreachable) and our own connection ends meanwhile: that loss is
    /// taken at once, not after the top-up's deadline (the mapping's Timeout) with the device's I/O held all along.
    /// </summary>
    [Fact]
    public async Task RunAsync_OwnConnectionEndsWhileFillingTheDeadSlot_LostAtOnce()
    {
        var connector = new FakeConnector().ThenServe().ThenServe().ThenHang();
        (RunningLoop started, ListLogger logger) = await StartPartlyAdoptedAndLoseTheOtherSlotAsync(connector);
        await using RunningLoop running = started;
        await TestMappings.WaitUntilAsync(() => connector.Calls == 3);

        _kernel.EndSocket(connector.Sessions.First().Socket);
        await running.WaitForAsync(MappingState.Reconnecting);

        Assert.Contains(logger.Entries, e => e.Message.Contains("connection lost (socket 1 of 1: connection closed or shut down)", StringComparison.Ordinal));
        Assert.DoesNotContain(logger.Entries, e => e.Message.Contains("filling it failed", StringComparison.Ordinal));
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_StopWhileFillingTheDeadSlot_Stopped()
    {
        var connector = new FakeConnector().ThenServe().ThenServe().ThenHang();
        (RunningLoop started, _) = await StartPartlyAdoptedAndLoseTheOtherSlotAsync(connector);
        await using RunningLoop running = started;
        await TestMappings.WaitUntilAsync(() => connector.Calls == 3);

        await running.StopAsync();

        Assert.Equal(MappingState.Stopped, running.States[^1]);
        Assert.Contains("nl-disconnect 2", _kernel.Operations);
    }

    /// <summary>A stale LINK_DEAD (no slot dead): the fresh connection is not taken, and the next stale one costs nothing.</summary>
    [Fact]
    public async Task RunAsync_NoDeadSlotToFill_FreshConnectionClosedNotTriedAgain()
    {
        var connector = new FakeConnector().ThenServe();
        (RunningLoop started, ListLogger logger) = await StartPartlyAdoptedAndLoseTheOtherSlotAsync(connector, staleEventOnly: true);
        await using RunningLoop running = started;
        await TestMappings.WaitUntilAsync(() => logger.Entries.Any(e => e.Message.Contains("NBD_CMD_RECONFIGURE (dead slot filled): kernel took 0 of 1 sockets", StringComparison.Ordinal)));
        Assert.True(connector.Sessions.Last().Disposed);
        Assert.Equal(3, connector.Calls);

        await PassLinkDeadGraceAsync(eventOnly: true, 2);
        await TestMappings.WaitUntilAsync(() => logger.Entries.Any(e => e.Message.Contains("LINK_DEAD for an earlier connection ignored", StringComparison.Ordinal)));

        Assert.Equal(3, connector.Calls);
        Assert.Equal(MappingState.Serving, running.States[^1]);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_ServerNoLongerMultiConnWhenFillingTheDeadSlot_NotOfferedServesOn()
    {
        var single = FakeConnector.DefaultExport with { TransmissionFlags = ExportDescription.FlagHasFlags };
        var connector = new FakeConnector().ThenServe().ThenServe().ThenServe(single);
        (RunningLoop started, ListLogger logger) = await StartPartlyAdoptedAndLoseTheOtherSlotAsync(connector);
        await using RunningLoop running = started;
        await TestMappings.WaitUntilAsync(() => logger.Entries.Any(e => e.Message.Contains("filling it failed (the server no longer allows several connections (no NBD_FLAG_CAN_MULTI_CONN))", StringComparison.Ordinal)));

        Assert.True(connector.Sessions.Last().Disposed);
        Assert.True(_kernel.NetlinkDevices[2].Dead[1]);
        Assert.Equal(1, _kernel.Operations.Count(o => o.StartsWith("nl-reconfigure", StringComparison.Ordinal)));
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_SocketWatchCannotStart_ServesOnAndLinkDeadStillReconnects()
    {
        _kernel.WatchFailure = new IOException("EMFILE");
        var connector = new FakeConnector().ThenServe();
        var logger = new ListLogger();
        var loop = new MappingLoop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time, logger, () => 0.5);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        await TestMappings.WaitUntilAsync(() => logger.Entries.Any(e => e.Message.Contains("watching the connection's sockets failed; relying on LINK_DEAD alone", StringComparison.Ordinal)));
        Assert.False(connector.Sessions.Single().ShutDown);

        _kernel.Netlink!.RaiseLinkDead();
        // Without a watch the event cannot be checked against the sockets: it counts at once (no grace).
        await running.WaitForAsync(MappingState.Serving, 2);

        Assert.Equal("nl-reconfigure 5 socks 1 id nbd-daemon:data", _kernel.Operations[^1]);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_LinkDeadAndSocketEndWithinGrace_CountsAsLost()
    {
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        _kernel.Netlink!.RaiseLinkDeadEventOnly();
        await TestMappings.WaitUntilAsync(() => _kernel.Operations.Contains("nl-link-dead 5"));
        _time.Advance(TimeSpan.FromMilliseconds(100));
        _kernel.NetlinkDevices[5].MarkDead(0);
        _kernel.EndSocket(connector.Sessions.Single().Socket);

        await running.WaitForAsync(MappingState.Serving, 2);
        Assert.Equal("nl-reconfigure 5 socks 1 id nbd-daemon:data", _kernel.Operations[^1]);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_EventSubscriptionLostAndRenewalFailsOnce_ServesOnAndRenewsASecondLater()
    {
        // Before: the failed renewal ended serving; the next attempts' RECONFIGURE found no dead slot (the connection
        // was fine), and with MaxAttempts the mapping gave up and disconnected a healthy device.
        var connector = new FakeConnector().ThenServe();
        var options = TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null,
            reconnect: ReconnectOptions.Default with { MaxAttempts = 2 });
        MappingLoop loop = TestMappings.Loop(options, connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        _kernel.OpenNetlinkFailures = 1;
        _kernel.Netlink!.LoseEvents();
        await TestMappings.WaitUntilAsync(() => _kernel.Operations.Contains("netlink open failed"));
        await Task.Delay(100);
        Assert.Equal(MappingState.Serving, loop.State);
        Assert.Equal(1, _kernel.Operations.Count(o => o == "netlink open"));

        _time.Advance(TimeSpan.FromSeconds(1));
        await TestMappings.WaitUntilAsync(() => _kernel.Operations.Count(o => o == "netlink open") == 2);

        Assert.Equal(MappingState.Serving, loop.State);
        Assert.Equal(1, running.States.Count(s => s == MappingState.Serving));
        Assert.DoesNotContain(_kernel.Operations, o => o.StartsWith("nl-disconnect", StringComparison.Ordinal));
        Assert.False(connector.Sessions.Single().ShutDown);
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_EventSubscriptionCannotBeRenewedAndTheConnectionEnds_ReconnectsInsteadOfSpinning()
    {
        // A broken subscription fails every wait at once: with the connection's end also done, the serve loop must
        // take the end, not renew again and again (one netlink open per pass, without delay).
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);

        _kernel.OpenNetlinkFailures = int.MaxValue;
        _kernel.Netlink!.LoseEvents();
        await TestMappings.WaitUntilAsync(() => _kernel.Operations.Contains("netlink open failed"));
        _kernel.EndSocket(connector.Sessions.Single().Socket, "the server closed the connection");
        await running.WaitForAsync(MappingState.Reconnecting);
        await Task.Delay(200);

        // One failed renewal in the serve loop, one in the next attempt (whose own failure is the retry's reason).
        Assert.InRange(_kernel.Operations.Count(o => o == "netlink open failed"), 1, 3);
        Assert.True(connector.Sessions.First().Disposed, "the ended connection was not released");
        await running.StopAsync();
    }

    [Fact]
    public async Task RunAsync_EventSubscriptionLostWhileServing_SubscribesAgainAndServesOnThenSeesTheNextLinkDead()
    {
        // ENOBUFS on the event socket: the subscription failed, not the connection. Treated as a loss it would tear the
        // healthy connection down, and RECONFIGURE would find no dead slot for the new socket.
        var connector = new FakeConnector().ThenServe();
        MappingLoop loop = TestMappings.Loop(TestMappings.Create(kernelInterface: KernelInterface.Netlink, device: null), connector, _kernel, _time);
        await using var running = RunningLoop.Start(loop);
        await running.WaitForAsync(MappingState.Serving);
        FakeNetlink first = _kernel.Netlink!;

        first.LoseEvents();
        await TestMappings.WaitUntilAsync(() => _kernel.Operations.Count(o => o == "netlink open") == 2);
        await TestMappings.WaitUntilAsync(() => _kernel.Operations.Contains("netlink close"));

        Assert.Equal(MappingState.Serving, loop.State);
        Assert.False(connector.Sessions.Single().ShutDown);
        Assert.Equal(1, connector.Calls);
        // The new subscription sees the next real LINK_DEAD.
        _kernel.Netlink!.RaiseLinkDead();
        await running.WaitForAsync(MappingState.Serving, 2);
        Assert.Equal("nl-reconfigure 5 socks 1 id nbd-daemon:data", _kernel.Operations[^1]);
        await running.StopAsync();
    }
}

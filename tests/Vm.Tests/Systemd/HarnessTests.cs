namespace Vm.Tests.Systemd;

/// <summary>
/// Proves the full tier itself, independent of the daemon: the image boots systemd to multi-user with the nbd
/// module, a stand-in Type=notify unit (systemd-notify + logger --journald) behaves as systemd promises, the
/// three NBD servers listen on loopback, and nbd-client gives the I/O and RSS baseline the daemon is compared to.
/// </summary>
[Collection(SystemdVmCollection.Name)]
public sealed class HarnessTests(SystemdVmFixture vm)
{
    [Fact]
    public void Boot_SystemdVm_RunsScenarioToItsEnd()
    {
        vm.RequireCompleteRun();
        Assert.Equal("0", vm.Value("scenario_exit"));
        Assert.Equal("252", vm.Value("systemd_version"));
        Assert.Equal("loaded", vm.Value("nbd_module"));
        Assert.True(vm.Number("nbd_devices") >= 16, "modprobe nbd should create at least 16 /sys/block/nbd* devices");
    }

    [Fact]
    public void NotifyStandIn_Start_ReturnsOnlyAfterReady()
    {
        Assert.Equal("0", vm.Value("harness_start_rc"));
        // The stand-in sleeps 1 s before READY=1: a start that returned sooner did not wait for READY.
        Assert.True(vm.Number("harness_start_ms") >= 1000, $"systemctl start returned after {vm.Value("harness_start_ms")} ms, before READY");
        Assert.Equal("active", vm.Value("harness_ActiveState"));
        Assert.Equal("running", vm.Value("harness_SubState"));
        Assert.True(vm.Number("harness_MainPID") > 1);
    }

    [Fact]
    public void NotifyStandIn_Status_VisibleInSystemctlShow() =>
        Assert.Equal("Harness: 1 mapping ready", vm.Value("harness_StatusText"));

    [Fact]
    public void NotifyStandIn_JournalNativeField_SearchableByJournalctl() =>
        Assert.True(vm.Number("harness_journal_field_count") >= 1, "journalctl MAPPING=harness found no entry");

    [Fact]
    public void NotifyStandIn_Stop_LeavesUnitInactive()
    {
        Assert.Equal("0", vm.Value("harness_stop_rc"));
        Assert.Equal("inactive", vm.Value("harness_after_stop_ActiveState"));
    }

    [Fact]
    public void Servers_NbdServerNbdkitQemuNbd_ListenOnLoopback()
    {
        Assert.Equal("up", vm.Value("server_nbd_server"));
        Assert.Equal("up", vm.Value("server_nbdkit"));
        Assert.Equal("up", vm.Value("server_qemu_nbd"));
    }

    [Fact]
    public void NbdClientBaseline_DirectIo_ReadsBackWhatItWrote()
    {
        Assert.Equal("0", vm.Value("client1_rc"));
        Assert.Equal("ok", vm.Value("client1_io_data"));
    }

    [Fact]
    public void NbdClientBaseline_SixteenDevices_ConnectMeasureAndDisconnect()
    {
        Assert.Equal(16, vm.Number("client16_connected"));
        Assert.Equal(16, vm.Number("client16_procs"));
        Assert.True(vm.Number("nbd_client_rss_kb_1") > 0);
        Assert.True(vm.Number("nbd_client_rss_kb_16") > vm.Number("nbd_client_rss_kb_1"));
        Assert.Equal(0, vm.Number("client_after_down_pids"));
    }
}

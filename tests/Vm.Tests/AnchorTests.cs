namespace Vm.Tests;

/// <summary>
/// The stock nbd-client on the real driver: proves the VM, the kernel module, nbd-server and direct I/O work, so a
/// failing daemon scenario points at the daemon.
/// </summary>
[Collection(VmCollection.Name)]
public sealed class AnchorTests(VmFixture vm)
{
    [Theory]
    [InlineData("ioctl")]
    [InlineData("netlink")]
    public async Task NbdClient_NbdServerExport_8MiBDirectRoundTripAndCleanDisconnect(string mode)
    {
        var run = await vm.RunAsync(ScenarioSpec.Anchor);
        var r = run.One("anchor", ("mode", mode));
        Expect.Equal(run, r, "connect_rc", 0);
        Expect.Equal(run, r, "connected", "yes");
        Expect.Equal(run, r, "size", 64L << 20);
        Expect.Equal(run, r, "write_rc", 0);
        Expect.Equal(run, r, "read_rc", 0);
        Expect.Equal(run, r, "readback", "match");
        Expect.Equal(run, r, "backing", "match");
        Expect.Equal(run, r, "disconnect_rc", 0);
        Expect.Equal(run, r, "freed", "yes");
    }
}

namespace Vm.Tests;

/// <summary>Scenario 1: nbd-daemon maps four real servers' exports over both kernel interfaces; 32 MiB O_DIRECT round trip.</summary>
[Collection(VmCollection.Name)]
public sealed class DaemonMapTests(VmFixture vm)
{
    [Theory]
    [InlineData("nbd-server", "ioctl")]
    [InlineData("nbd-server", "netlink")]
    [InlineData("nbdkit-file", "ioctl")]
    [InlineData("nbdkit-file", "netlink")]
    [InlineData("nbdkit-memory", "ioctl")]
    [InlineData("nbdkit-memory", "netlink")]
    [InlineData("qemu-nbd", "ioctl")]
    [InlineData("qemu-nbd", "netlink")]
    public async Task Connect_RealServer_32MiBDirectWriteReadsBackAndReachesBackingFile(string server, string mode)
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonMap);
        var r = run.One("map", ("server", server), ("mode", mode));
        Expect.Equal(run, r, "connected", "yes");
        Expect.Equal(run, r, "size", 64L << 20);
        Expect.Equal(run, r, "write_rc", 0);
        Expect.Equal(run, r, "read_rc", 0);
        Expect.Equal(run, r, "readback", "match");
        // The memory plugin has no file to look into; every other server's backing file must hold the same bytes.
        Expect.Equal(run, r, "backing", server == "nbdkit-memory" ? "none" : "match");
        Expect.Equal(run, r, "exit_rc", 0);
        Expect.Equal(run, r, "freed", "yes");
    }

    [Fact]
    public async Task List_NbdServerWithTwoExports_NamesBoth()
    {
        var run = await vm.RunAsync(ScenarioSpec.DaemonMap);
        var r = run.One("list");
        Expect.Equal(run, r, "rc", 0);
        Expect.Equal(run, r, "has_srv", "yes");
        Expect.Equal(run, r, "has_other", "yes");
    }
}

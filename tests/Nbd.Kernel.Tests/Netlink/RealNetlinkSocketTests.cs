using Nbd.Kernel.Interop;
using Nbd.Kernel.Netlink;

namespace Nbd.Kernel.Tests.Netlink;

/// <summary>
/// The real AF_NETLINK socket against this host's kernel, using the always-present controller family: proves
/// socket/bind/sendto/recv, our message bytes and our parser against the kernel without needing the nbd module.
/// </summary>
public sealed class RealNetlinkSocketTests
{
    [Fact]
    public void Resolve_Nlctrl_ReturnsFixedIdAndNotifyGroup()
    {
        using var client = new GenericNetlinkClient(NetlinkSocket.Open());
        var family = GenericNetlinkFamily.Resolve(client, "nlctrl");
        Assert.Equal(NetlinkConstants.GENL_ID_CTRL, family.Id);
        Assert.Equal("nlctrl", family.Name);
        Assert.True(family.MulticastGroups.ContainsKey("notify"), string.Join(",", family.MulticastGroups.Keys));
    }

    [Fact]
    public void Resolve_UnknownFamily_KernelAcksEnoent()
    {
        using var client = new GenericNetlinkClient(NetlinkSocket.Open());
        var ex = Assert.Throws<NbdKernelException>(() => GenericNetlinkFamily.Resolve(client, "nosuchfam"));
        Assert.Equal(Errno.ENOENT, ex.Errno);
        Assert.Equal("CTRL_CMD_GETFAMILY", ex.Operation);
    }

    [Fact]
    public void Resolve_NameLongerThanGenlNamsiz_KernelRefusesWithExtendedAckText()
    {
        // CTRL_ATTR_FAMILY_NAME is limited to GENL_NAMSIZ-1 bytes; the policy check answers EINVAL with a reason
        // in the extended ACK, which exercises our NLM_F_ACK_TLVS parsing against the real kernel.
        using var client = new GenericNetlinkClient(NetlinkSocket.Open());
        var ex = Assert.Throws<NbdKernelException>(() => GenericNetlinkFamily.Resolve(client, "a-family-name-longer-than-16"));
        Assert.Equal(Errno.EINVAL, ex.Errno);
        Assert.False(string.IsNullOrEmpty(ex.Detail), ex.Message);
    }

    [Fact]
    public async Task JoinGroup_NlctrlNotify_ThenCancelledReceive()
    {
        using var client = new GenericNetlinkClient(NetlinkSocket.Open());
        var family = GenericNetlinkFamily.Resolve(client, "nlctrl");
        client.Transport.JoinGroup(family.MulticastGroups["notify"]);
        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(100));
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await client.Transport.ReceiveAsync(new byte[4096], cts.Token));
    }
}

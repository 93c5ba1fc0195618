using Nbd.Protocol.Tests.Interop.Support;

namespace Nbd.Protocol.Tests.Interop;

/// <summary>The handshake client against real qemu-nbd servers (raw over TCP, qcow2 read-only over a unix socket).</summary>
public sealed class QemuNbdInteropTests(QemuNbdFixture fixture) : IClassFixture<QemuNbdFixture>
{
    [Fact]
    public async Task ConnectAsync_RawOverTcp_AgreesWithServerAndTransmits()
    {
        using var deadline = InteropChecks.Deadline();
        await InteropChecks.ConnectAgreesAndTransmitsAsync(fixture.TcpUri(QemuNbdFixture.RawExport), QemuNbdFixture.RawSize, fixture.RawContent, deadline.Token);
    }

    [Fact]
    public async Task ConnectAsync_Qcow2OverUnixSocket_AgreesWithServerAndTransmits()
    {
        using var deadline = InteropChecks.Deadline();
        await InteropChecks.ConnectAgreesAndTransmitsAsync(fixture.UnixUri(QemuNbdFixture.QcowExport), QemuNbdFixture.QcowSize, fixture.QcowContent, deadline.Token);
    }

    [Fact]
    public async Task ConnectAsync_ReadOnlyQcow2_IsReadOnlyAndRaw_IsNot()
    {
        using var deadline = InteropChecks.Deadline();
        using var qcow = await NbdClient.ConnectAsync(NbdUri.Parse(fixture.UnixUri(QemuNbdFixture.QcowExport)), null, deadline.Token);
        using var raw = await NbdClient.ConnectAsync(NbdUri.Parse(fixture.TcpUri(QemuNbdFixture.RawExport)), null, deadline.Token);
        Assert.True(qcow.Export.Flags.HasFlag(TransmissionFlags.ReadOnly));
        Assert.False(raw.Export.Flags.HasFlag(TransmissionFlags.ReadOnly));
        Assert.NotNull(qcow.Export.BlockSizes);
        Assert.NotNull(raw.Export.BlockSizes);
    }

    [Fact]
    public async Task GetInfoAsync_RawOverTcp_AgreesWithNbdinfoIncludingDescription()
    {
        using var deadline = InteropChecks.Deadline();
        var info = await InteropChecks.InfoAgreesAsync(fixture.TcpUri(QemuNbdFixture.RawExport), deadline.Token);
        Assert.Equal(QemuNbdFixture.RawDescription, info.Description);
        Assert.Equal((ulong)QemuNbdFixture.RawSize, info.Size);
    }

    [Fact]
    public async Task GetInfoAsync_Qcow2OverUnixSocket_AgreesWithNbdinfo()
    {
        using var deadline = InteropChecks.Deadline();
        var info = await InteropChecks.InfoAgreesAsync(fixture.UnixUri(QemuNbdFixture.QcowExport), deadline.Token);
        Assert.Equal((ulong)QemuNbdFixture.QcowSize, info.Size);
    }

    [Fact]
    public async Task ListExportsAsync_Tcp_ReturnsTheExport()
    {
        using var deadline = InteropChecks.Deadline();
        await InteropChecks.ListAgreesAsync(fixture.TcpUri(""), [QemuNbdFixture.RawExport], deadline.Token);
    }

    [Fact]
    public async Task ListExportsAsync_UnixSocket_ReturnsTheExport()
    {
        using var deadline = InteropChecks.Deadline();
        await InteropChecks.ListAgreesAsync(fixture.UnixUri(""), [QemuNbdFixture.QcowExport], deadline.Token);
    }

    [Fact]
    public async Task ConnectAsync_UnknownExport_ThrowsServerErrorNamingExport()
    {
        using var deadline = InteropChecks.Deadline();
        await InteropChecks.UnknownExportIsTypedAsync(fixture.TcpUri("wrong"), deadline.Token);
    }

    [Fact]
    public async Task ConnectAsync_UnknownExportOverUnixSocket_ThrowsServerErrorNamingExport()
    {
        using var deadline = InteropChecks.Deadline();
        await InteropChecks.UnknownExportIsTypedAsync(fixture.UnixUri("wrong"), deadline.Token);
    }
}

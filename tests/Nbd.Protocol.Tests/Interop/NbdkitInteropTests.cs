using Nbd.Protocol.Tests.Interop.Support;
using Nbd.Protocol.Tests.TestSupport;

namespace Nbd.Protocol.Tests.Interop;

/// <summary>The handshake client against real nbdkit servers: newstyle over TCP and a unix socket, and oldstyle.</summary>
public sealed class NbdkitInteropTests(NbdkitFixture fixture) : IClassFixture<NbdkitFixture>
{
    [Fact]
    public async Task ConnectAsync_TcpFileExport_AgreesWithServerAndTransmits()
    {
        using var deadline = InteropChecks.Deadline();
        await InteropChecks.ConnectAgreesAndTransmitsAsync(fixture.NewstyleUri(NbdkitFixture.DiskExport), NbdkitFixture.FileSize, fixture.FileContent, deadline.Token);
    }

    [Fact]
    public async Task ConnectAsync_BlocksizePolicyFilter_NegotiatesConfiguredBlockSizes()
    {
        using var deadline = InteropChecks.Deadline();
        using var connection = await NbdClient.ConnectAsync(NbdUri.Parse(fixture.NewstyleUri(NbdkitFixture.DiskExport)), null, deadline.Token);
        Assert.Equal(new BlockSizeConstraints(NbdkitFixture.BlockMinimum, NbdkitFixture.BlockPreferred, NbdkitFixture.BlockMaximum), connection.Export.BlockSizes);
    }

    [Fact]
    public async Task GetInfoAsync_TcpFileExport_AgreesWithNbdinfoIncludingDescription()
    {
        using var deadline = InteropChecks.Deadline();
        var info = await InteropChecks.InfoAgreesAsync(fixture.NewstyleUri(NbdkitFixture.DiskExport), deadline.Token);
        Assert.Equal(NbdkitFixture.Description, info.Description);
        Assert.Equal((ulong)NbdkitFixture.FileSize, info.Size);
    }

    [Fact]
    public async Task ListExportsAsync_ExplicitExportList_ReturnsNamesWithDescriptions()
    {
        using var deadline = InteropChecks.Deadline();
        await InteropChecks.ListAgreesAsync(fixture.NewstyleUri(""), [NbdkitFixture.DiskExport, NbdkitFixture.SpareExport], deadline.Token);
        var listing = await NbdClient.ListExportsAsync(NbdUri.Parse(fixture.NewstyleUri("")), null, deadline.Token);
        Assert.All(listing, e => Assert.Equal(NbdkitFixture.Description, e.Description));
    }

    [Fact]
    public async Task ConnectAsync_StrictExportNameFilter_UnknownExportThrowsServerError()
    {
        using var deadline = InteropChecks.Deadline();
        await InteropChecks.UnknownExportIsTypedAsync(fixture.NewstyleUri("not-listed"), deadline.Token);
    }

    [Fact]
    public async Task ConnectAsync_UnixSocketMemoryPlugin_AgreesWithServerAndTransmits()
    {
        using var deadline = InteropChecks.Deadline();
        await InteropChecks.ConnectAgreesAndTransmitsAsync(fixture.UnixUri("mem"), NbdkitFixture.MemorySize, new byte[InteropChecks.ReadLength], deadline.Token);
    }

    [Fact]
    public async Task ConnectAsync_UnixSocketMemoryPlugin_WriteThenReadRoundTrips()
    {
        using var deadline = InteropChecks.Deadline();
        var pattern = new byte[InteropChecks.ReadLength];
        new Random(42).NextBytes(pattern);
        const ulong offset = NbdkitFixture.MemorySize - 4096;

        using var connection = await NbdClient.ConnectAsync(NbdUri.Parse(fixture.UnixUri("mem")), null, deadline.Token);
        await RawTransmission.WriteAsync(connection.Socket, offset, pattern, cookie: 1, deadline.Token);
        byte[] back = await RawTransmission.ReadAsync(connection.Socket, offset, (uint)pattern.Length, cookie: 2, deadline.Token);
        await RawTransmission.DisconnectAsync(connection.Socket, deadline.Token);

        Assert.Equal(pattern, back);
    }

    [Fact]
    public async Task GetInfoAsync_UnixSocketMemoryPlugin_AgreesWithNbdinfo()
    {
        using var deadline = InteropChecks.Deadline();
        var info = await InteropChecks.InfoAgreesAsync(fixture.UnixUri("mem"), deadline.Token);
        Assert.Equal((ulong)NbdkitFixture.MemorySize, info.Size);
    }

    [Fact]
    public async Task ConnectAsync_Oldstyle_AgreesWithServerAndTransmits()
    {
        using var deadline = InteropChecks.Deadline();
        await InteropChecks.ConnectAgreesAndTransmitsAsync(fixture.OldstyleUri, NbdkitFixture.OldstyleSize, fixture.OldstyleContent, deadline.Token);
    }

    [Fact]
    public async Task ConnectAsync_OldstyleReadOnly_ReportsReadOnlyWithoutBlockSizes()
    {
        using var deadline = InteropChecks.Deadline();
        using var connection = await NbdClient.ConnectAsync(NbdUri.Parse(fixture.OldstyleUri), null, deadline.Token);
        Assert.True(connection.Export.Flags.HasFlag(TransmissionFlags.ReadOnly));
        Assert.Null(connection.Export.BlockSizes); // the oldstyle greeting has no room for them
    }

    [Fact]
    public async Task ListExportsAsync_Oldstyle_ThrowsUnsupported()
    {
        using var deadline = InteropChecks.Deadline();
        var ex = await Assert.ThrowsAsync<NbdProtocolException>(() => NbdClient.ListExportsAsync(NbdUri.Parse(fixture.OldstyleUri), null, deadline.Token));
        Assert.Equal(NbdProtocolError.Unsupported, ex.Error);
    }
}

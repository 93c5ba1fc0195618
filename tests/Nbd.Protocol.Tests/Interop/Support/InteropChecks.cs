using Nbd.Protocol.Tests.TestSupport;

namespace Nbd.Protocol.Tests.Interop.Support;

/// <summary>
/// The checks every real server gets. Expected values come from how the fixture built the export (sizes, bytes,
/// names) or from nbdinfo (flags, block sizes, descriptions), never from constants guessed about a server.
/// </summary>
internal static class InteropChecks
{
    public const int ReadLength = 512;

    /// <summary>A per-test bound: a hung server fails the test instead of stalling the run.</summary>
    public static CancellationTokenSource Deadline() => new(TimeSpan.FromSeconds(20));

    /// <summary>
    /// ConnectAsync (NBD_OPT_GO) gives the size, flags and block sizes the server offers, and leaves the socket at
    /// the first transmission byte: a hand-made NBD_CMD_READ returns the backing bytes, NBD_CMD_DISC ends cleanly.
    /// </summary>
    public static async Task ConnectAgreesAndTransmitsAsync(string uri, ulong expectedSize, ReadOnlyMemory<byte> expectedStart, CancellationToken ct)
    {
        var oracle = await NbdInfoOracle.DescribeAsync(uri, ct);
        using var connection = await NbdClient.ConnectAsync(NbdUri.Parse(uri), null, ct);
        var export = connection.Export;

        Assert.Equal(NbdUri.Parse(uri).ExportName, export.Name);
        Assert.Equal(expectedSize, export.Size);
        Assert.Equal(oracle.FlagsWithoutStructuredReplies, export.Flags);
        Assert.False(export.Flags.HasFlag(TransmissionFlags.SendDf), "SEND_DF without structured replies violates proto.md.");
        Assert.Equal(oracle.BlockSizes, export.BlockSizes);

        byte[] data = await RawTransmission.ReadAsync(connection.Socket, offset: 0, ReadLength, cookie: 0x1122334455667788, ct);
        Assert.Equal(expectedStart[..ReadLength].ToArray(), data);
        await RawTransmission.DisconnectAsync(connection.Socket, ct);
    }

    /// <summary>GetInfoAsync (NBD_OPT_INFO) reports what nbdinfo (also NBD_OPT_INFO) reports.</summary>
    public static async Task<NbdExportInfo> InfoAgreesAsync(string uri, CancellationToken ct)
    {
        var oracle = await NbdInfoOracle.DescribeAsync(uri, ct);
        var info = await NbdClient.GetInfoAsync(NbdUri.Parse(uri), null, ct);

        Assert.Equal(oracle.Name, info.Name);
        Assert.Equal(oracle.Size, info.Size);
        Assert.Equal(oracle.FlagsWithoutStructuredReplies, info.Flags);
        Assert.Equal(oracle.BlockSizes, info.BlockSizes);
        Assert.Equal(oracle.Description, info.Description);
        return info;
    }

    /// <summary>An export the server does not have: NBD_REP_ERR_UNKNOWN to NBD_OPT_GO, typed and naming the export.</summary>
    public static async Task UnknownExportIsTypedAsync(string uri, CancellationToken ct)
    {
        string name = NbdUri.Parse(uri).ExportName;
        var ex = await Assert.ThrowsAsync<NbdServerErrorException>(() => NbdClient.ConnectAsync(NbdUri.Parse(uri), null, ct));
        Assert.Equal(NbdOption.Go, ex.Option);
        Assert.Equal(NbdReplyType.ErrUnknown, ex.ReplyType);
        Assert.Equal(name, ex.ExportName);
        Assert.Contains($"'{name}'", ex.Message, StringComparison.Ordinal);
        Assert.NotNull(ex.Server);
    }

    /// <summary>ListExportsAsync returns exactly the configured names, and what nbdinfo --list sees.</summary>
    public static async Task ListAgreesAsync(string serverUri, IEnumerable<string> configuredNames, CancellationToken ct)
    {
        var listing = await NbdClient.ListExportsAsync(NbdUri.Parse(serverUri), null, ct);
        var oracle = await NbdInfoOracle.ListAsync(serverUri, ct);

        Assert.Equal(configuredNames.Order(StringComparer.Ordinal), listing.Select(e => e.Name).Order(StringComparer.Ordinal));
        Assert.Equal(oracle.Select(e => e.Name).Order(StringComparer.Ordinal), listing.Select(e => e.Name).Order(StringComparer.Ordinal));
    }
}

namespace Nbd.Protocol;

internal sealed partial class NbdHandshake
{
    // GO asks for what the kernel needs; INFO also asks for the name and description a person wants to see.
    private static readonly NbdInfoType[] GoRequests = [NbdInfoType.Export, NbdInfoType.BlockSize];
    private static readonly NbdInfoType[] InfoRequests = [NbdInfoType.Export, NbdInfoType.BlockSize, NbdInfoType.Name, NbdInfoType.Description];
    private static readonly NbdReplyType[] InfoOrAck = [NbdReplyType.Info, NbdReplyType.Ack];

    /// <summary>
    /// Ends the handshake on <paramref name="exportName"/> so transmission can start. Fixed newstyle: NBD_OPT_GO,
    /// falling back to NBD_OPT_EXPORT_NAME when the server answers NBD_REP_ERR_UNSUP (proto.md: clients "SHOULD
    /// fall back"). Non-fixed newstyle: NBD_OPT_EXPORT_NAME. Oldstyle: the greeting already said everything.
    /// </summary>
    public async Task<NbdExportInfo> GoAsync(string exportName, CancellationToken ct)
    {
        switch (Style)
        {
            case NegotiationStyle.Oldstyle:
                return OldstyleInfo(exportName);
            case NegotiationStyle.Newstyle:
                return await ExportNameAsync(exportName, ct);
            default:
                try
                {
                    return await InfoOrGoAsync(NbdOption.Go, exportName, ct);
                }
                catch (NbdServerErrorException ex) when (ex.ReplyType == NbdReplyType.ErrUnsup)
                {
                    return await ExportNameAsync(exportName, ct);
                }
        }
    }

    /// <summary>NBD_OPT_INFO: what GO would give, without entering transmission.</summary>
    public async Task<NbdExportInfo> InfoAsync(string exportName, CancellationToken ct)
    {
        if (Style == NegotiationStyle.Oldstyle)
        {
            return OldstyleInfo(exportName);
        }

        RequireFixedNewstyle(NbdOption.Info);
        return await InfoOrGoAsync(NbdOption.Info, exportName, ct);
    }

    /// <summary>
    /// proto.md "Oldstyle negotiation": the server serves its one export and the client has no way to name one. A
    /// non-empty name asked for would silently get whatever that export is ("If the client is unhappy with what he
    /// receives, he should disconnect"), so only the empty name is accepted.
    /// </summary>
    private NbdExportInfo OldstyleInfo(string exportName)
    {
        if (exportName.Length != 0)
        {
            throw new NbdProtocolException(
                NbdProtocolError.Unsupported,
                $"Server speaks the oldstyle handshake, which cannot select an export: refusing to serve its only export as '{exportName}' (use an empty export name for it).");
        }

        var (size, flags) = OldstyleExport!.Value;
        return new NbdExportInfo(exportName, size, flags, null, null);
    }

    // proto.md "NBD_OPT_INFO and NBD_OPT_GO": zero or more NBD_REP_INFO, then NBD_REP_ACK or an error.
    private async Task<NbdExportInfo> InfoOrGoAsync(NbdOption option, string exportName, CancellationToken ct)
    {
        await SendOptionAsync(NbdWire.BuildInfoRequest(option, exportName, option == NbdOption.Go ? GoRequests : InfoRequests), option, ct);
        var info = new NbdWire.InfoBuilder();
        for (int replies = 0; ; replies++)
        {
            if (replies > NbdWire.MaxInfoReplies)
            {
                throw new NbdProtocolException(NbdProtocolError.OversizedLength, $"Server sent more than {NbdWire.MaxInfoReplies} NBD_REP_INFO replies to {NbdServerErrorException.OptionName(option)}.");
            }

            var (type, payload) = await ReadReplyAsync(option, InfoOrAck, ct);
            if (type == NbdReplyType.Ack)
            {
                return info.Build(exportName, option);
            }

            NbdWire.ParseInfo(payload, info);
        }
    }

    // proto.md "NBD_OPT_EXPORT_NAME": size, flags, and 124 zeroes unless NO_ZEROES was negotiated. A server that
    // cannot serve the export closes the connection instead of replying.
    private async Task<NbdExportInfo> ExportNameAsync(string exportName, CancellationToken ct)
    {
        await SendOptionAsync(NbdWire.BuildExportName(exportName), NbdOption.ExportName, ct);
        byte[] reply;
        try
        {
            reply = await ReadExactAsync(NbdWire.ExportNameReplyLength, "the NBD_OPT_EXPORT_NAME reply", ct);
        }
        catch (NbdProtocolException ex) when (ex.Error == NbdProtocolError.Truncated)
        {
            throw new NbdProtocolException(NbdProtocolError.Truncated,
                $"Server closed the connection after NBD_OPT_EXPORT_NAME '{exportName}'; the export probably does not exist or needs TLS.", ex);
        }

        if (!SentFlags.HasFlag(ClientFlags.NoZeroes))
        {
            await ReadExactAsync(NbdWire.ReservedZeroesLength, "the 124 reserved bytes after the NBD_OPT_EXPORT_NAME reply", ct);
        }

        var (size, flags) = NbdWire.ParseExportNameReply(reply);
        return new NbdExportInfo(exportName, size, flags, null, null);
    }
}

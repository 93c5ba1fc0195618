namespace Nbd.Protocol;

internal sealed partial class NbdHandshake
{
    private static readonly NbdReplyType[] ServerOrAck = [NbdReplyType.Server, NbdReplyType.Ack];

    /// <summary>
    /// NBD_OPT_LIST (proto.md): zero or more NBD_REP_SERVER, then NBD_REP_ACK or an error. Each reply is bounded by
    /// <see cref="NbdWire.MaxPayloadLength"/>, and their number by the configured maximum.
    /// </summary>
    public async Task<IReadOnlyList<NbdExportListing>> ListAsync(CancellationToken ct)
    {
        RequireFixedNewstyle(NbdOption.List);
        await SendOptionAsync(NbdWire.BuildOption(NbdOption.List, []), NbdOption.List, ct);
        var exports = new List<NbdExportListing>();
        while (true)
        {
            var (type, payload) = await ReadReplyAsync(NbdOption.List, ServerOrAck, ct);
            if (type == NbdReplyType.Ack)
            {
                return exports;
            }

            if (exports.Count >= _maxListEntries)
            {
                throw new NbdProtocolException(NbdProtocolError.OversizedLength, $"Server listed more than {_maxListEntries} exports.");
            }

            exports.Add(NbdWire.ParseServerReply(payload));
        }
    }
}

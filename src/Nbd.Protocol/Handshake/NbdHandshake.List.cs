namespace Nbd.Protocol;

internal sealed partial class NbdHandshake
{
    private static readonly NbdReplyType[] ServerOrAck = [NbdReplyType.Server, NbdReplyType.Ack];

    /// <summary>
    /// Bound on the summed NBD_REP_SERVER payloads of one listing: the per-reply and count bounds alone would still
    /// let a server make the client hold 100 000 × 8 KiB.
    /// </summary>
    internal const long MaxListBytes = 16L * 1024 * 1024;

    /// <summary>
    /// NBD_OPT_LIST (proto.md): zero or more NBD_REP_SERVER, then NBD_REP_ACK or an error. Each reply is bounded by
    /// <see cref="NbdWire.MaxPayloadLength"/>, and their number by the configured maximum.
    /// </summary>
    public async Task<IReadOnlyList<NbdExportListing>> ListAsync(CancellationToken ct)
    {
        RequireFixedNewstyle(NbdOption.List);
        await SendOptionAsync(NbdWire.BuildOption(NbdOption.List, []), NbdOption.List, ct);
        var exports = new List<NbdExportListing>();
        long totalBytes = 0;
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

            totalBytes += payload.Length;
            if (totalBytes > MaxListBytes)
            {
                throw new NbdProtocolException(NbdProtocolError.OversizedLength, $"Server's export list exceeds {MaxListBytes} bytes.");
            }

            exports.Add(NbdWire.ParseServerReply(payload));
        }
    }
}

namespace Nbd.Protocol;

internal sealed partial class NbdHandshake
{
    private static readonly NbdReplyType[] AckOnly = [NbdReplyType.Ack];

    /// <summary>
    /// NBD_OPT_STARTTLS (proto.md "TLS support"). Returns when the server answers NBD_REP_ACK, after which the
    /// session MUST be upgraded to TLS before anything else is sent; error replies are raised as
    /// <see cref="NbdServerErrorException"/>.
    /// </summary>
    public async Task StartTlsAsync(CancellationToken ct)
    {
        RequireFixedNewstyle(NbdOption.StartTls);
        await SendOptionAsync(NbdWire.BuildOption(NbdOption.StartTls, []), NbdOption.StartTls, ct);
        await ReadReplyAsync(NbdOption.StartTls, AckOnly, ct);
    }
}

namespace Nbd.Protocol;

internal sealed partial class NbdHandshake
{
    /// <summary>Export learned from an oldstyle greeting; null for newstyle servers.</summary>
    public (ulong Size, TransmissionFlags Flags)? OldstyleExport { get; private set; }

    /// <summary>
    /// Reads the greeting (proto.md "Oldstyle negotiation", "Newstyle negotiation"). Oldstyle: reads size, flags and
    /// the 124 reserved bytes; the handshake is then complete. Newstyle: reads the handshake flags and sends client
    /// flags, echoing FIXED_NEWSTYLE and NO_ZEROES when offered.
    /// </summary>
    public async Task GreetAsync(CancellationToken ct)
    {
        byte[] greeting = await ReadExactAsync(NbdWire.GreetingLength, "the server greeting (NBDMAGIC + magic)", ct);
        if (!NbdWire.ParseGreeting(greeting))
        {
            Style = NegotiationStyle.Oldstyle;
            byte[] rest = await ReadExactAsync(NbdWire.OldstyleRestLength, "the oldstyle size, flags and reserved bytes", ct);
            OldstyleExport = NbdWire.ParseOldstyleRest(rest);
            return;
        }

        byte[] flagBytes = await ReadExactAsync(NbdWire.HandshakeFlagsLength, "the handshake flags", ct);
        ServerFlags = (HandshakeFlags)System.Buffers.Binary.BinaryPrimitives.ReadUInt16BigEndian(flagBytes);
        Style = ServerFlags.HasFlag(HandshakeFlags.FixedNewstyle) ? NegotiationStyle.FixedNewstyle : NegotiationStyle.Newstyle;
        SentFlags = NbdWire.ChooseClientFlags(ServerFlags);

        var reply = new byte[NbdWire.ClientFlagsLength];
        NbdWire.WriteClientFlags(reply, SentFlags);
        await WriteAsync(reply, "the client flags", ct);
    }
}

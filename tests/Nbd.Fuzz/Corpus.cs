using System.Globalization;
using System.Text;
using Nbd.Protocol;

namespace Nbd.Fuzz;

/// <summary>What the client is asked to do over one connection.</summary>
internal enum FuzzOperation
{
    /// <summary>NBD_OPT_GO with the EXPORT_NAME fallback; what the daemon's (re)connect does.</summary>
    Go,
    /// <summary>NBD_OPT_LIST, then NBD_OPT_ABORT.</summary>
    List,
    /// <summary>NBD_OPT_INFO, then NBD_OPT_ABORT.</summary>
    Info,
}

/// <summary>A server stream that follows the protocol, and the outcome the client must report for it.</summary>
internal sealed record ValidStream(ServerWriter Writer, string Expected, string Shape);

/// <summary>
/// Valid server streams for every negotiation path the client has: oldstyle, non-fixed newstyle, fixed newstyle
/// with GO/INFO (INFO replies in any order, unknown info types), the GO → EXPORT_NAME fallback on ERR_UNSUP, LIST,
/// error replies, and the STARTTLS refusal of nbds:// URIs. Each comes with its expected <see cref="Outcome"/>
/// signature, so unmutated streams double as an oracle.
/// </summary>
internal static class Corpus
{
    /// <summary>The export every fuzz URI asks for.</summary>
    public const string ExportName = "disk";

    private static readonly NbdReplyType[] Errors =
    [
        NbdReplyType.ErrUnsup, NbdReplyType.ErrPolicy, NbdReplyType.ErrInvalid, NbdReplyType.ErrPlatform,
        NbdReplyType.ErrTlsReqd, NbdReplyType.ErrUnknown, NbdReplyType.ErrShutdown, NbdReplyType.ErrBlockSizeReqd,
        NbdReplyType.ErrTooBig, NbdReplyType.ErrExtHeaderReqd, (NbdReplyType)0x8000_7777,
    ];

    // Strings that are valid UTF-8 without NUL, from ASCII to 4-byte sequences.
    private static readonly string[] Alphabet = ["a", "b", "z", "0", "-", "_", ".", "/", " ", "é", "ß", "日", "本", "😀"];

    public static ValidStream Build(ref FuzzRandom r, FuzzOperation op, bool tls)
    {
        int style = r.Next(10);
        if (style == 0)
        {
            return Oldstyle(ref r, op, tls);
        }

        if (style == 1)
        {
            return NonFixedNewstyle(ref r, op, tls);
        }

        bool noZeroes = r.OneIn(2);
        var w = new ServerWriter().Newstyle((ushort)(noZeroes ? 3 : 1));
        if (tls)
        {
            return StartTls(ref r, w);
        }

        return op switch
        {
            FuzzOperation.Go => Go(ref r, w, noZeroes),
            FuzzOperation.Info => Info(ref r, w, NbdOption.Info),
            _ => List(ref r, w),
        };
    }

    private static ValidStream Oldstyle(ref FuzzRandom r, FuzzOperation op, bool tls)
    {
        ulong size = RandomSize(ref r);
        uint flags = r.NextU32();
        var w = new ServerWriter().Oldstyle(size, flags);
        // Oldstyle cannot select an export: LIST is unsupported, and GO/INFO for the named export the engine asks for
        // are refused rather than answered with the server's only export.
        string expected = tls ? Outcome.TlsNotSupported(accepted: false) : Outcome.Protocol(NbdProtocolError.Unsupported);
        return new ValidStream(w, expected, "oldstyle");
    }

    private static ValidStream NonFixedNewstyle(ref FuzzRandom r, FuzzOperation op, bool tls)
    {
        ushort handshakeFlags = (ushort)(r.OneIn(2) ? 0 : 2);
        var w = new ServerWriter().Newstyle(handshakeFlags);
        if (tls || op != FuzzOperation.Go)
        {
            return new ValidStream(w, tls ? Outcome.TlsNotSupported(accepted: false) : Outcome.Protocol(NbdProtocolError.Unsupported), "newstyle");
        }

        ulong size = RandomSize(ref r);
        ushort flags = (ushort)(r.NextU32() | 1); // NBD_FLAG_HAS_FLAGS, as proto.md requires: never 0, which the client refuses
        w.ExportNameReply(size, flags, zeroes: handshakeFlags == 0);
        return new ValidStream(w, Outcome.Export(ExportName, size, flags, null, null), "newstyle+export-name");
    }

    // proto.md "TLS support": this client refuses TLS after asking, whatever the server answers.
    private static ValidStream StartTls(ref FuzzRandom r, ServerWriter w)
    {
        if (r.OneIn(2))
        {
            w.Ack(NbdOption.StartTls);
            return new ValidStream(w, Outcome.TlsNotSupported(accepted: true), "starttls-ack");
        }

        w.Error(NbdOption.StartTls, r.Pick<NbdReplyType>(Errors), r.OneIn(2) ? null : RandomString(ref r, 40));
        return new ValidStream(w, Outcome.TlsNotSupported(accepted: false), "starttls-refused");
    }

    private static ValidStream Go(ref FuzzRandom r, ServerWriter w, bool noZeroes)
    {
        int path = r.Next(6);
        if (path == 0)
        {
            // ERR_UNSUP to GO: the client falls back to EXPORT_NAME.
            w.Error(NbdOption.Go, NbdReplyType.ErrUnsup, r.OneIn(2) ? null : "GO unsupported");
            ulong size = RandomSize(ref r);
            ushort flags = (ushort)(r.NextU32() | 1); // NBD_FLAG_HAS_FLAGS, as proto.md requires: never 0, which the client refuses
            w.ExportNameReply(size, flags, zeroes: !noZeroes);
            return new ValidStream(w, Outcome.Export(ExportName, size, flags, null, null), "go-unsup-fallback");
        }

        if (path == 1)
        {
            var error = r.Pick<NbdReplyType>(Errors.AsSpan(1));
            w.Error(NbdOption.Go, error, r.OneIn(2) ? null : RandomString(ref r, 60));
            return new ValidStream(w, Outcome.ServerError(error), "go-error");
        }

        return Info(ref r, w, NbdOption.Go);
    }

    // proto.md "NBD_OPT_INFO and NBD_OPT_GO": NBD_REP_INFO replies in any order, then NBD_REP_ACK.
    private static ValidStream Info(ref FuzzRandom r, ServerWriter w, NbdOption option)
    {
        if (option == NbdOption.Info && r.OneIn(8))
        {
            var error = r.Pick<NbdReplyType>(Errors);
            w.Error(option, error, r.OneIn(2) ? null : RandomString(ref r, 60));
            return new ValidStream(w, Outcome.ServerError(error), "info-error");
        }

        ulong size = RandomSize(ref r);
        ushort flags = (ushort)(r.NextU32() | 1); // NBD_FLAG_HAS_FLAGS, as proto.md requires: never 0, which the client refuses
        BlockSizeConstraints? blockSizes = r.OneIn(2) ? RandomBlockSizes(ref r) : null;
        string? name = r.OneIn(3) ? RandomString(ref r, 30) : null;
        string? description = r.OneIn(3) ? RandomString(ref r, 60) : null;
        bool unknown = r.OneIn(4);

        // Five slots, emitted in a random order; an absent item is skipped.
        Span<int> order = [0, 1, 2, 3, 4];
        for (int i = order.Length - 1; i > 0; i--)
        {
            int j = r.Next(i + 1);
            (order[i], order[j]) = (order[j], order[i]);
        }

        foreach (int item in order)
        {
            switch (item)
            {
                case 0:
                    w.InfoExport(option, size, flags);
                    break;
                case 1 when blockSizes is not null:
                    w.InfoBlockSize(option, blockSizes.Minimum, blockSizes.Preferred, blockSizes.Maximum);
                    break;
                case 2 when name is not null:
                    w.InfoRaw(option, 1, Encoding.UTF8.GetBytes(name));
                    break;
                case 3 when description is not null:
                    w.InfoRaw(option, 2, Encoding.UTF8.GetBytes(description));
                    break;
                case 4 when unknown:
                    // "The client MUST ignore information replies it does not understand."
                    w.InfoRaw(option, (ushort)r.Next(4, 0x10000), [1, 2, 3, 4, 5]);
                    break;
            }
        }

        w.Ack(option);
        if (option == NbdOption.Info)
        {
            w.Ack(NbdOption.Abort);
        }

        return new ValidStream(w, Outcome.Export(name ?? ExportName, size, flags, blockSizes, description), option == NbdOption.Go ? "go" : "info");
    }

    private static ValidStream List(ref FuzzRandom r, ServerWriter w)
    {
        if (r.OneIn(8))
        {
            var error = r.Pick<NbdReplyType>(Errors);
            w.Error(NbdOption.List, error, r.OneIn(2) ? null : RandomString(ref r, 60));
            return new ValidStream(w, Outcome.ServerError(error), "list-error");
        }

        var listed = new List<NbdExportListing>();
        for (int n = r.Next(5); n > 0; n--)
        {
            string name = r.OneIn(6) ? "" : RandomString(ref r, 30);
            string? description = r.OneIn(2) ? RandomString(ref r, 40) : null;
            w.Server(name, description);
            listed.Add(new NbdExportListing(name, string.IsNullOrEmpty(description) ? null : description));
        }

        w.Ack(NbdOption.List).Ack(NbdOption.Abort);
        return new ValidStream(w, Outcome.Listing(listed), "list");
    }

    private static ulong RandomSize(ref FuzzRandom r) => r.Next(4) switch
    {
        0 => 0,
        1 => ulong.MaxValue,
        2 => (ulong)r.Next(1, 1 << 20) * 512,
        _ => r.NextU64(),
    };

    // proto.md "Size constraints": minimum a power of two ≤ 64 KiB, preferred a power of two ≥ max(minimum, 512),
    // maximum ≥ preferred.
    private static BlockSizeConstraints RandomBlockSizes(ref FuzzRandom r)
    {
        int minShift = r.Next(0, 17);
        int preferredShift = r.Next(Math.Max(minShift, 9), 21);
        uint preferred = 1u << preferredShift;
        uint maximum = r.Next(3) switch
        {
            0 => uint.MaxValue,
            1 => preferred,
            _ => preferred + (uint)r.Next(1 << 25),
        };
        return new BlockSizeConstraints(1u << minShift, preferred, maximum);
    }

    public static string RandomString(ref FuzzRandom r, int maxRunes)
    {
        var s = new StringBuilder();
        for (int n = r.Next(1, maxRunes + 1); n > 0; n--)
        {
            s.Append(r.Pick<string>(Alphabet));
        }

        return s.ToString();
    }
}

/// <summary>
/// The outcome of one handshake as a comparable string: "ok ..." with every field of the result, or the exception
/// type with the field a caller decides on (protocol error, reply type, whether STARTTLS was accepted).
/// </summary>
internal static class Outcome
{
    public static string Export(string name, ulong size, ushort flags, BlockSizeConstraints? blockSizes, string? description) =>
        string.Create(CultureInfo.InvariantCulture,
            $"ok export name='{name}' size={size} flags=0x{flags:x4} bs={(blockSizes is null ? "-" : $"{blockSizes.Minimum}/{blockSizes.Preferred}/{blockSizes.Maximum}")} desc={(description is null ? "-" : $"'{description}'")}");

    public static string Export(NbdExportInfo e) => Export(e.Name, e.Size, (ushort)e.Flags, e.BlockSizes, e.Description);

    public static string Listing(IReadOnlyList<NbdExportListing> exports) =>
        "ok list [" + string.Join(", ", exports.Select(e => e.Description is null ? $"'{e.Name}'" : $"'{e.Name}':'{e.Description}'")) + "]";

    public static string Protocol(NbdProtocolError error) => $"{nameof(NbdProtocolException)}:{error}";

    public static string ServerError(NbdReplyType type) =>
        string.Create(CultureInfo.InvariantCulture, $"{(type == NbdReplyType.ErrTlsReqd ? nameof(NbdTlsRequiredException) : nameof(NbdServerErrorException))}:0x{(uint)type:x8}");

    public static string TlsNotSupported(bool accepted) => $"{nameof(NbdTlsNotSupportedException)}:accepted={accepted}";

    public static string Of(Exception ex) => ex switch
    {
        NbdProtocolException p => Protocol(p.Error),
        NbdServerErrorException s => ServerError(s.ReplyType),
        NbdTlsNotSupportedException t => TlsNotSupported(t.ServerAcceptedStartTls),
        NbdTimeoutException t => $"{nameof(NbdTimeoutException)}:{t.Phase}",
        _ => ex.GetType().Name,
    };

    public static string OfResult(object? result) => result switch
    {
        NbdExportInfo e => Export(e),
        IReadOnlyList<NbdExportListing> l => Listing(l),
        _ => "ok",
    };

    /// <summary>The counter key of a failure: the exception type, with the protocol error or TLS answer.</summary>
    public static string Category(string outcome) =>
        outcome.StartsWith(nameof(NbdServerErrorException), StringComparison.Ordinal) || outcome.StartsWith(nameof(NbdTlsRequiredException), StringComparison.Ordinal)
            ? outcome[..outcome.IndexOf(':', StringComparison.Ordinal)]
            : outcome;

    public static bool IsSuccess(string outcome) => outcome.StartsWith("ok", StringComparison.Ordinal);
}

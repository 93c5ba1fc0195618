using System.Diagnostics;
using System.Text.Json;

namespace Nbd.Protocol.Tests.Interop.Support;

/// <summary>What libnbd's nbdinfo says the server offers for one export: the independent oracle for these tests.</summary>
/// <param name="Name">The export name nbdinfo reports (canonical when the server sent NBD_INFO_NAME).</param>
/// <param name="Size">Export size as the server announced it to NBD_OPT_INFO.</param>
/// <param name="Flags">Transmission flags rebuilt from nbdinfo's is_*/can_* booleans (see <see cref="NbdInfoOracle"/>).</param>
/// <param name="BlockSizes">NBD_INFO_BLOCK_SIZE, or null when the server sent none.</param>
/// <param name="Description">NBD_INFO_DESCRIPTION, or null.</param>
/// <param name="StructuredReplies">Whether nbdinfo negotiated structured replies (it does when the server allows).</param>
internal sealed record OracleExport(string Name, ulong Size, TransmissionFlags Flags, BlockSizeConstraints? BlockSizes, string? Description, bool StructuredReplies)
{
    /// <summary>
    /// The flags our client must see. proto.md "Transmission flags": NBD_FLAG_SEND_DF "MUST NOT" be set unless
    /// structured replies were negotiated. nbdinfo negotiates them; our client never does (the kernel driver only
    /// understands simple replies), so DF is the one bit a conforming server shows nbdinfo and not us.
    /// </summary>
    public TransmissionFlags FlagsWithoutStructuredReplies => Flags & ~TransmissionFlags.SendDf;
}

/// <summary>Runs <c>nbdinfo --json</c> (Debian package libnbd-bin) and parses it.</summary>
internal static class NbdInfoOracle
{
    private static readonly (string Field, TransmissionFlags Flag)[] FlagFields =
    [
        ("is_read_only", TransmissionFlags.ReadOnly),
        ("can_flush", TransmissionFlags.SendFlush),
        ("can_fua", TransmissionFlags.SendFua),
        ("is_rotational", TransmissionFlags.Rotational),
        ("can_trim", TransmissionFlags.SendTrim),
        ("can_zero", TransmissionFlags.SendWriteZeroes),
        ("can_df", TransmissionFlags.SendDf),
        ("can_multi_conn", TransmissionFlags.CanMultiConn),
        ("can_cache", TransmissionFlags.SendCache),
        ("can_fast_zero", TransmissionFlags.SendFastZero),
    ];

    /// <summary>nbdinfo --json URI: one export (libnbd asks with NBD_OPT_INFO, then NBD_OPT_GO to probe content).</summary>
    public static async Task<OracleExport> DescribeAsync(string uri, CancellationToken ct)
    {
        using var json = await RunAsync(["--json", uri], ct);
        var root = json.RootElement;
        bool structured = root.TryGetProperty("structured", out var s) && s.GetBoolean();
        var exports = root.GetProperty("exports");
        Assert.Equal(1, exports.GetArrayLength());
        return Parse(exports[0], structured);
    }

    /// <summary>nbdinfo --list --json URI: every export the server lists.</summary>
    public static async Task<IReadOnlyList<OracleExport>> ListAsync(string uri, CancellationToken ct)
    {
        using var json = await RunAsync(["--list", "--json", uri], ct);
        var root = json.RootElement;
        bool structured = root.TryGetProperty("structured", out var s) && s.GetBoolean();
        return [.. root.GetProperty("exports").EnumerateArray().Select(e => Parse(e, structured))];
    }

    private static OracleExport Parse(JsonElement export, bool structured)
    {
        // NBD_FLAG_HAS_FLAGS: libnbd refuses servers that omit it, so every export nbdinfo shows has it.
        var flags = TransmissionFlags.HasFlags;
        foreach (var (field, flag) in FlagFields)
        {
            if (export.GetProperty(field).GetBoolean())
            {
                flags |= flag;
            }
        }

        BlockSizeConstraints? blockSizes = export.TryGetProperty("block_size_minimum", out var min)
            ? new BlockSizeConstraints(min.GetUInt32(), export.GetProperty("block_size_preferred").GetUInt32(), export.GetProperty("block_size_maximum").GetUInt32())
            : null;
        string? description = export.TryGetProperty("description", out var d) ? d.GetString() : null;
        return new OracleExport(
            export.GetProperty("export-name").GetString()!,
            export.GetProperty("export-size").GetUInt64(),
            flags,
            blockSizes,
            description,
            structured);
    }

    private static async Task<JsonDocument> RunAsync(IReadOnlyList<string> args, CancellationToken ct)
    {
        var info = new ProcessStartInfo(ExternalTool.Require("nbdinfo", "libnbd-bin"))
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (string arg in args)
        {
            info.ArgumentList.Add(arg);
        }

        using var process = Process.Start(info)!;
        var stdout = process.StandardOutput.ReadToEndAsync(ct);
        var stderr = process.StandardError.ReadToEndAsync(ct);
        try
        {
            await process.WaitForExitAsync(ct);
        }
        catch (OperationCanceledException)
        {
            process.Kill();
            throw;
        }

        string output = await stdout;
        if (process.ExitCode != 0)
        {
            throw new InvalidOperationException($"nbdinfo {string.Join(' ', args)} exited with {process.ExitCode}: {await stderr}");
        }

        return JsonDocument.Parse(output);
    }
}

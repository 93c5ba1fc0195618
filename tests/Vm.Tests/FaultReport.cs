using System.Globalization;
using System.Text;

namespace Vm.Tests;

/// <summary>One scenario × interface of tests/vm/scenarios/faults.sh: its <c>RESULT fault ...</c> line.</summary>
public sealed record FaultRow(
    string Scenario,
    string Interface,
    string Relay,
    long Rounds,
    long AppIoErrors,
    long KernelIoErrors,
    long VerifyFailures,
    long MaxStallAfterBackMs,
    long MaxGapMs,
    string ServedAgain,
    ResultLine Line)
{
    /// <summary>The row of a <c>RESULT fault</c> line, or a <see cref="FormatException"/> naming the missing or bad key.</summary>
    public static FaultRow From(ResultLine line)
    {
        ArgumentNullException.ThrowIfNull(line);
        if (line.Scenario != FaultReport.ResultName)
        {
            throw new FormatException($"not a '{FaultReport.ResultName}' line: RESULT {line.Raw}");
        }

        return new FaultRow(
            line["scenario"], line["interface"], line["relay"], line.Long("rounds"), line.Long("app_io_errors"),
            line.Long("kernel_io_errors"), line.Long("verify_failures"), line.Long("max_stall_after_back_ms"),
            line.Long("max_gap_ms"), line["served_again"], line);
    }
}

/// <summary>The fault suite's results table: every <c>RESULT fault</c> line of a console, as a markdown table.</summary>
public sealed class FaultReport
{
    public const string ResultName = "fault";

    /// <summary>The per-fault note: <c>NOTE fault-round ...</c>.</summary>
    public const string RoundName = "fault-round";

    private const string RoundMarker = "NOTE ";

    private FaultReport(IReadOnlyList<FaultRow> rows) => Rows = rows;

    public IReadOnlyList<FaultRow> Rows { get; }

    public static FaultReport Parse(string console)
    {
        ArgumentNullException.ThrowIfNull(console);
        var rows = new List<FaultRow>();
        foreach (var text in console.Split('\n'))
        {
            if (ResultLine.TryParse(text, out var line) && line!.Scenario == ResultName)
            {
                rows.Add(FaultRow.From(line));
            }
        }

        return new FaultReport(rows);
    }

    /// <summary>The <c>NOTE fault-round scenario=S? interface=I ...</c> lines of one case, one per fault, in order:
    /// the per-fault figures (<c>fault=</c> or <c>step=</c>, <c>stall_after_back_ms</c>, <c>app_io_errors</c>,
    /// <c>served_again</c>).</summary>
    public static IReadOnlyList<ResultLine> Rounds(string console, string scenario, string iface)
    {
        ArgumentNullException.ThrowIfNull(console);
        var rounds = new List<ResultLine>();
        foreach (var text in console.Split('\n'))
        {
            if (ResultLine.TryParse(text, RoundMarker, out var line) && line!.Scenario == RoundName &&
                line.Matches(("scenario", scenario), ("interface", iface)))
            {
                rounds.Add(line);
            }
        }

        return rounds;
    }

    public FaultRow Row(string scenario, string iface) =>
        Rows.SingleOrDefault(r => r.Scenario == scenario && r.Interface == iface)
        ?? throw new KeyNotFoundException($"no 'RESULT fault scenario={scenario} interface={iface}' line");

    /// <summary>The same columns tests/vm/faults.sh prints.</summary>
    public string ToMarkdown()
    {
        var sb = new StringBuilder()
            .Append("| scenario | interface | relay | rounds | app I/O errors | kernel I/O errors | verify failures | max stall after back (ms) | longest gap (ms) | served again |\n")
            .Append("|---|---|---|---|---|---|---|---|---|---|\n");
        foreach (var r in Rows)
        {
            sb.Append(CultureInfo.InvariantCulture,
                $"| {r.Scenario} | {r.Interface} | {r.Relay} | {r.Rounds} | {r.AppIoErrors} | {r.KernelIoErrors} | {r.VerifyFailures} | {r.MaxStallAfterBackMs} | {r.MaxGapMs} | {r.ServedAgain} |\n");
        }

        return sb.ToString();
    }
}

using System.Text;
using Xunit.Sdk;

namespace Vm.Tests;

/// <summary>The outcome of one VM boot: run-vm.sh's exit code, the serial console, and the parsed RESULT lines.</summary>
public sealed class VmRun
{
    public VmRun(string scenario, int exitCode, string output, TimeSpan elapsed)
    {
        Scenario = scenario;
        ExitCode = exitCode;
        Output = output;
        Elapsed = elapsed;
        var results = new List<ResultLine>();
        foreach (var line in output.Split('\n'))
        {
            if (ResultLine.TryParse(line, out var r))
            {
                results.Add(r!);
            }
        }

        Results = results;
    }

    public string Scenario { get; }

    public int ExitCode { get; }

    public string Output { get; }

    public TimeSpan Elapsed { get; }

    public IReadOnlyList<ResultLine> Results { get; }

    /// <summary>True when the VM reached the scenario's end marker (run-vm.sh exits 125 when it did not).</summary>
    public bool Completed => Output.Contains("@@NBDVM-END rc=", StringComparison.Ordinal);

    /// <summary>The single RESULT line of <paramref name="scenario"/> matching the filter, or a failure showing the console.</summary>
    public ResultLine One(string scenario, params (string Key, string Value)[] filter)
    {
        var hits = Results.Where(r => r.Scenario == scenario && r.Matches(filter)).ToList();
        if (hits.Count != 1)
        {
            var what = string.Join(' ', filter.Select(f => $"{f.Key}={f.Value}"));
            throw new XunitException(
                $"expected one 'RESULT {scenario} {what}' line from VM scenario {Scenario}, found {hits.Count}" +
                $" (run-vm.sh exit {ExitCode}, end marker {(Completed ? "seen" : "NOT seen")}).\n{Tail()}");
        }

        return hits[0];
    }

    /// <summary>The RESULT line plus the daemon log lines the scenario printed after it: context for a failure.</summary>
    public string Context(ResultLine line)
    {
        ArgumentNullException.ThrowIfNull(line);
        var lines = Output.Split('\n');
        var at = Array.FindIndex(lines, l => l.Contains("RESULT " + line.Raw, StringComparison.Ordinal));
        var sb = new StringBuilder().Append("RESULT ").AppendLine(line.Raw);
        for (var i = at + 1; at >= 0 && i < lines.Length && !lines[i].Contains("RESULT ", StringComparison.Ordinal) && i < at + 40; i++)
        {
            sb.AppendLine(lines[i]);
        }

        return sb.ToString();
    }

    public string Tail(int count = 80)
    {
        var lines = Output.Split('\n');
        return "--- serial console (last lines) ---\n" + string.Join('\n', lines.Skip(Math.Max(0, lines.Length - count)));
    }
}

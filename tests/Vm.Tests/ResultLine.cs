using System.Globalization;

namespace Vm.Tests;

/// <summary>
/// One machine-readable line a scenario printed on the serial console: <c>RESULT &lt;scenario&gt; key=value ...</c>.
/// Scenarios only measure; the tests decide.
/// </summary>
public sealed record ResultLine(string Scenario, IReadOnlyDictionary<string, string> Values, string Raw)
{
    private const string Marker = "RESULT ";

    /// <summary>
    /// Parses a console line. The marker may be preceded by terminal noise (SeaBIOS clears the screen on the same
    /// line), so it is searched for rather than required at column 0.
    /// </summary>
    public static bool TryParse(string line, out ResultLine? result) => TryParse(line, Marker, out result);

    /// <summary>The same for a line with another marker (<c>"NOTE "</c>: a scenario's per-round notes in the same
    /// <c>name key=value ...</c> form).</summary>
    public static bool TryParse(string line, string marker, out ResultLine? result)
    {
        ArgumentNullException.ThrowIfNull(line);
        ArgumentException.ThrowIfNullOrEmpty(marker);
        result = null;
        var at = line.IndexOf(marker, StringComparison.Ordinal);
        if (at < 0)
        {
            return false;
        }

        var text = line[(at + marker.Length)..].Trim();
        var tokens = text.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        if (tokens.Length == 0 || tokens[0].Contains('=', StringComparison.Ordinal))
        {
            return false;
        }

        var values = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var token in tokens.Skip(1))
        {
            var eq = token.IndexOf('=', StringComparison.Ordinal);
            if (eq <= 0)
            {
                return false;
            }

            values[token[..eq]] = token[(eq + 1)..];
        }

        result = new ResultLine(tokens[0], values, text);
        return true;
    }

    public string this[string key] => Values.TryGetValue(key, out var v)
        ? v
        : throw new KeyNotFoundException($"'{key}' missing from: RESULT {Raw}");

    public long Long(string key) => long.TryParse(this[key], NumberStyles.Integer, CultureInfo.InvariantCulture, out var v)
        ? v
        : throw new FormatException($"'{key}' is not a number in: RESULT {Raw}");

    public bool Matches(params (string Key, string Value)[] filter) =>
        filter.All(f => Values.TryGetValue(f.Key, out var v) && v == f.Value);
}

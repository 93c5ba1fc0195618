using System.Globalization;
using System.Text.RegularExpressions;

namespace Vm.Tests.Systemd;

/// <summary>
/// The <c>RESULT systemd key=value</c> lines of one full-tier VM run (host side and serial console alike).
/// Serial output arrives with CR LF and kernel messages may share a line, so a result is matched anywhere in a line
/// and the value ends at the line end; a key printed twice keeps its last value.
/// </summary>
internal sealed partial class SystemdVmResults
{
    private readonly Dictionary<string, string> _values;

    private SystemdVmResults(Dictionary<string, string> values) => _values = values;

    public IReadOnlyDictionary<string, string> Values => _values;

    [GeneratedRegex(@"RESULT systemd (?<key>[A-Za-z0-9_]+)=(?<value>.*)$")]
    private static partial Regex ResultLine();

    public static SystemdVmResults Parse(string output)
    {
        ArgumentNullException.ThrowIfNull(output);
        var values = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var raw in output.Split('\n'))
        {
            var match = ResultLine().Match(raw.TrimEnd('\r'));
            if (match.Success)
            {
                values[match.Groups["key"].Value] = match.Groups["value"].Value.TrimEnd();
            }
        }

        return new SystemdVmResults(values);
    }

    public bool TryGet(string key, out string value) => _values.TryGetValue(key, out value!);

    public static bool TryParseLong(string value, out long number) =>
        long.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out number);
}

using System.Globalization;
using System.Text;

namespace NbdDaemon.Mappings;

/// <summary>Formats the one-line STATUS= text systemctl status shows.</summary>
internal static class MappingStatus
{
    /// <summary>Long exception messages would swamp `systemctl status`; each reason is cut at this length.</summary>
    public const int MaxReasonLength = 120;

    public static string Format(IReadOnlyCollection<MappingLoop> loops) =>
        Format(loops.Select(l => (l.Name, l.State, l.LastFailure)).ToList());

    public static string Format(IReadOnlyList<(string Name, MappingState State, string? LastFailure)> mappings)
    {
        if (mappings.Count == 0)
        {
            return "no mappings configured";
        }

        int serving = mappings.Count(m => m.State == MappingState.Serving);
        var text = new StringBuilder();
        text.Append(CultureInfo.InvariantCulture, $"{serving} of {mappings.Count} mappings serving");
        string separator = "; failing: ";
        foreach ((string name, MappingState state, string? failure) in mappings)
        {
            if (state == MappingState.Serving || failure is null)
            {
                continue;
            }

            string reason = failure.Length > MaxReasonLength ? FailureText.Prefix(failure, MaxReasonLength) + "…" : failure;
            string prefix = state switch
            {
                MappingState.GaveUp => "gave up: ",
                MappingState.Failed => "failed: ",
                _ => string.Empty,
            };
            text.Append(separator).Append(name).Append(" (").Append(prefix).Append(reason).Append(')');
            separator = ", ";
        }

        return text.ToString();
    }
}

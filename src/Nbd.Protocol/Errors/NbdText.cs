namespace Nbd.Protocol;

/// <summary>Text a server sent (an error message, an export's name or description), made safe to print on one line.</summary>
public static class NbdText
{
    /// <summary>
    /// <paramref name="text"/> with control characters, the backslash, line and paragraph separators and format
    /// characters (bidirectional overrides, which reorder what a terminal shows) written as <c>\uXXXX</c>, JSON's
    /// spelling: a newline would start a line of its own in a log (one that could pass for the daemon's), a TAB split
    /// a field, an escape sequence drive the terminal. Everything else, non-ASCII letters included, is kept.
    /// </summary>
    public static string Printable(string text)
    {
        if (!text.Any(Escaped))
        {
            return text;
        }

        var escaped = new System.Text.StringBuilder(text.Length + 16);
        foreach (char c in text)
        {
            if (Escaped(c))
            {
                escaped.Append(System.Globalization.CultureInfo.InvariantCulture, $"\\u{(int)c:x4}");
            }
            else
            {
                escaped.Append(c);
            }
        }

        return escaped.ToString();
    }

    private static bool Escaped(char c) => char.IsControl(c) || c == '\\'
        || char.GetUnicodeCategory(c) is System.Globalization.UnicodeCategory.Format
            or System.Globalization.UnicodeCategory.LineSeparator or System.Globalization.UnicodeCategory.ParagraphSeparator;
}

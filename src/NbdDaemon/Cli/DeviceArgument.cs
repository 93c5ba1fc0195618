using System.Globalization;
using Nbd.Kernel;

namespace NbdDaemon.Cli;

/// <summary>Parses the DEVICE argument of the verbs: <c>/dev/nbdN</c>, or <c>nbdN</c> for short.</summary>
internal static class DeviceArgument
{
    public static bool TryParse(string text, out string path, out int index, out string? error)
    {
        var name = text.StartsWith("/dev/", StringComparison.Ordinal) ? text["/dev/".Length..] : text;
        var digits = name.StartsWith("nbd", StringComparison.Ordinal) ? name[3..] : "";
        // Up to six digits, as Nbd.Kernel's device names (the driver's nbds_max is far below that).
        var canonical = digits.Length is > 0 and <= 6 && (digits.Length == 1 || digits[0] != '0');
        if (!canonical || !int.TryParse(digits, NumberStyles.None, CultureInfo.InvariantCulture, out index))
        {
            path = text;
            index = -1;
            error = $"'{text}' is not an nbd device: expected /dev/nbdN";
            return false;
        }

        path = NbdKernel.DevicePath(index);
        error = null;
        return true;
    }
}

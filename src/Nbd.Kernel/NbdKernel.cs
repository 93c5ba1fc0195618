using System.Globalization;

namespace Nbd.Kernel;

/// <summary>Facts about the Linux nbd driver.</summary>
public static class NbdKernel
{
    /// <summary>Block devices of the nbd driver are named /dev/nbdN.</summary>
    public const string DevicePrefix = "/dev/nbd";

    /// <summary>The most digits of N this library takes (the driver's nbds_max is far below a million).</summary>
    public const int MaxIndexDigits = 6;

    /// <summary>/dev/nbd<paramref name="index"/>.</summary>
    public static string DevicePath(int index) => DevicePrefix + index.ToString(CultureInfo.InvariantCulture);

    /// <summary>
    /// Whether <paramref name="path"/> is /dev/nbdN spelt as <see cref="DevicePath"/> spells it: N of 1 to
    /// <see cref="MaxIndexDigits"/> digits without a leading zero. /dev/nbd01 is no device node, and two spellings of
    /// one device would defeat a check for duplicates.
    /// </summary>
    public static bool TryParseDevicePath(string path, out int index)
    {
        ReadOnlySpan<char> digits = path.StartsWith(DevicePrefix, StringComparison.Ordinal) ? path.AsSpan(DevicePrefix.Length) : [];
        bool canonical = digits.Length is > 0 and <= MaxIndexDigits && (digits.Length == 1 || digits[0] != '0');
        if (canonical && int.TryParse(digits, NumberStyles.None, CultureInfo.InvariantCulture, out index))
        {
            return true;
        }

        index = -1;
        return false;
    }
}

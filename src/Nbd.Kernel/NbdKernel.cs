namespace Nbd.Kernel;

/// <summary>Facts about the Linux nbd driver.</summary>
public static class NbdKernel
{
    /// <summary>Block devices of the nbd driver are named /dev/nbdN.</summary>
    public const string DevicePrefix = "/dev/nbd";

    /// <summary>/dev/nbd<paramref name="index"/>.</summary>
    public static string DevicePath(int index) => DevicePrefix + index.ToString(System.Globalization.CultureInfo.InvariantCulture);
}

using Nbd.Kernel;

namespace NbdDaemon.Cli;

/// <summary>Parses the DEVICE argument of the verbs: <c>/dev/nbdN</c>, or <c>nbdN</c> for short.</summary>
internal static class DeviceArgument
{
    public static bool TryParse(string text, out string path, out int index, out string? error)
    {
        if (!NbdKernel.TryParseDevicePath(text.StartsWith("/dev/", StringComparison.Ordinal) ? text : "/dev/" + text, out index))
        {
            path = text;
            error = text.StartsWith('-') ? $"unknown option '{text}'" : $"'{text}' is not an nbd device: expected /dev/nbdN (or nbdN)";
            return false;
        }

        path = NbdKernel.DevicePath(index);
        error = null;
        return true;
    }
}

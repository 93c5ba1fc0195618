using NbdDaemon.Cli;

namespace NbdDaemon.Tests.Cli;

public sealed class DeviceArgumentTests
{
    [Theory]
    [InlineData("/dev/nbd0", "/dev/nbd0", 0)]
    [InlineData("nbd12", "/dev/nbd12", 12)]
    [InlineData("/dev/nbd999999", "/dev/nbd999999", 999999)]
    public void TryParse_NbdDevice_CanonicalPathAndIndex(string text, string path, int index)
    {
        Assert.True(DeviceArgument.TryParse(text, out string parsed, out int parsedIndex, out string? error), error);
        Assert.Equal((path, index), (parsed, parsedIndex));
    }

    [Theory]
    [InlineData("nbd1234567")] // more digits than a device name has: refused here (exit 2), not by the kernel layer
    [InlineData("/dev/sda")]
    [InlineData("nbd01")]
    [InlineData("nbd")]
    [InlineData("/dev/nbd-1")]
    public void TryParse_NotAnNbdDevice_RefusedNamingIt(string text)
    {
        Assert.False(DeviceArgument.TryParse(text, out _, out _, out string? error));
        Assert.Equal($"'{text}' is not an nbd device: expected /dev/nbdN (or nbdN)", error);
    }
}

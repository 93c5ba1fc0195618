namespace Nbd.Kernel.Tests;

public sealed class NbdKernelTests
{
    [Theory]
    [InlineData("/dev/nbd0", 0)]
    [InlineData("/dev/nbd15", 15)]
    [InlineData("/dev/nbd999999", 999999)]
    public void TryParseDevicePath_CanonicalPath_Index(string path, int expected)
    {
        Assert.True(NbdKernel.TryParseDevicePath(path, out int index));
        Assert.Equal(expected, index);
        Assert.Equal(path, NbdKernel.DevicePath(index)); // the one spelling, both ways
    }

    [Theory]
    [InlineData("/dev/nbd")]
    [InlineData("/dev/nbd01")]
    [InlineData("/dev/nbd00")]
    [InlineData("/dev/nbd1000000")]
    [InlineData("/dev/nbd-1")]
    [InlineData("/dev/nbd+1")]
    [InlineData("/dev/nbd 1")]
    [InlineData("/dev/nbd1 ")]
    [InlineData("/dev/nbd١")] // an Arabic-Indic digit: a digit to char.IsDigit, not to the kernel
    [InlineData("/dev/NBD1")]
    [InlineData("nbd1")]
    [InlineData("/dev/sda1")]
    [InlineData("/dev/../dev/nbd1")]
    [InlineData("")]
    public void TryParseDevicePath_AnythingElse_False(string path)
    {
        Assert.False(NbdKernel.TryParseDevicePath(path, out int index));
        Assert.Equal(-1, index);
    }
}

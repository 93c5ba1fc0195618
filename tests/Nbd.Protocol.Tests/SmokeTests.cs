namespace Nbd.Protocol.Tests;

public sealed class SmokeTests
{
    [Fact]
    public void Assembly_Loads_True() => Assert.True(typeof(SmokeTests).Assembly.GetName().Name == "Nbd.Protocol.Tests");
}

namespace Vm.Tests;

public sealed class SmokeTests
{
    [Fact]
    public void Assembly_Loads_True() => Assert.True(typeof(SmokeTests).Assembly.GetName().Name == "Vm.Tests");
}

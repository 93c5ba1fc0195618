using System.CommandLine;

namespace NbdDaemon.Tests.Hosting;

public sealed class ProgramTests
{
    private static async Task<(int Exit, string[]? HostArgs)> InvokeAsync(params string[] args)
    {
        string[]? seen = null;
        RootCommand root = Program.CreateRootCommand((hostArgs, _) =>
        {
            seen = hostArgs;
            return Task.FromResult(42);
        });
        var output = new StringWriter();
        int exit = await root.Parse(args).InvokeAsync(new InvocationConfiguration { Output = output, Error = output, ProcessTerminationTimeout = null });
        return (exit, seen);
    }

    [Fact]
    public async Task Invoke_NoVerb_RunsDaemonWithHostSwitches()
    {
        (int exit, string[]? hostArgs) = await InvokeAsync("--Nbd:Mappings:0:Name=data", "--Nbd:Mappings:0:Uri=nbd://127.0.0.1:10809/data");
        Assert.Equal(42, exit);
        Assert.Equal(["--Nbd:Mappings:0:Name=data", "--Nbd:Mappings:0:Uri=nbd://127.0.0.1:10809/data"], Assert.IsType<string[]>(hostArgs));
    }

    [Fact]
    public async Task Invoke_RunVerb_RunsDaemonWithHostSwitches()
    {
        (int exit, string[]? hostArgs) = await InvokeAsync("run", "--Serilog:MinimumLevel:Default=Debug");
        Assert.Equal(42, exit);
        Assert.Equal(["--Serilog:MinimumLevel:Default=Debug"], Assert.IsType<string[]>(hostArgs));
    }

    [Fact]
    public async Task Invoke_NoArguments_RunsDaemon()
    {
        (int exit, string[]? hostArgs) = await InvokeAsync();
        Assert.Equal(42, exit);
        Assert.Equal([], Assert.IsType<string[]>(hostArgs));
    }

    [Fact]
    public async Task Invoke_Help_DoesNotRunDaemon()
    {
        (int exit, string[]? hostArgs) = await InvokeAsync("--help");
        Assert.Equal(0, exit);
        Assert.Null(hostArgs);
    }
}

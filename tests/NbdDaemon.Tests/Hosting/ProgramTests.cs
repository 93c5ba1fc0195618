using System.CommandLine;

namespace NbdDaemon.Tests.Hosting;

public sealed class ProgramTests
{
    private string Output { get; set; } = "";

    private async Task<(int Exit, string[]? HostArgs)> InvokeAsync(params string[] args)
    {
        string[]? seen = null;
        RootCommand root = Program.CreateRootCommand((hostArgs, _) =>
        {
            seen = hostArgs;
            return Task.FromResult(42);
        });
        var output = new StringWriter();
        int exit = await Program.InvokeAsync(root, args, new InvocationConfiguration { Output = output, Error = output, ProcessTerminationTimeout = null });
        Output = output.ToString();
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

    /// <summary>A closed standard output (<c>--version &gt;&amp;-</c>) still ended in an unhandled exception.</summary>
    [Theory]
    [InlineData("--version", false)]
    [InlineData("--help", false)]
    [InlineData("--version", true)]
    [InlineData("--help", true)]
    public async Task Invoke_StandardOutputRefuses_Exit1WithAMessageNotAStackTrace(string option, bool closed)
    {
        var error = new StringWriter();
        var output = new RefusingWriter(closed);

        int exit = await Program.InvokeAsync(
            Program.CreateRootCommand((_, _) => Task.FromResult(42)), [option],
            new InvocationConfiguration { Output = output, Error = error, ProcessTerminationTimeout = null });

        Assert.Equal(1, exit);
        Assert.Equal(output.Said, error.ToString());
    }

    /// <summary>A setting's value that is also a verb's name was taken as the verb ("has no value", or the verb run).</summary>
    [Theory]
    [InlineData("run")]
    [InlineData("list")]
    [InlineData("check")]
    public async Task Invoke_SettingWhoseValueIsAVerbName_RunsDaemonWithIt(string value)
    {
        (int exit, string[]? hostArgs) = await InvokeAsync("--Nbd:Mappings:0:Name", value, "--Nbd:Mappings:0:Uri=nbd://h/x");
        Assert.Equal(42, exit);
        Assert.Equal(["--Nbd:Mappings:0:Name", value, "--Nbd:Mappings:0:Uri=nbd://h/x"], Assert.IsType<string[]>(hostArgs));
    }

    [Fact]
    public async Task Invoke_Help_DoesNotRunDaemon()
    {
        (int exit, string[]? hostArgs) = await InvokeAsync("--help");
        Assert.Equal(0, exit);
        Assert.Null(hostArgs);
    }

    [Theory]
    [InlineData("disconect /dev/nbd0", "disconect")]
    [InlineData("stop", "stop")]
    [InlineData("run status", "status")]
    [InlineData("--Nbd:Mappings:0:Name=data oops", "oops")]
    [InlineData("/dev/nbd0", "/dev/nbd0")]                          // the verb forgotten: no setting has a '/' in its name
    [InlineData("--Nbd:Mappings:0:Name=data /dev/nbd0", "/dev/nbd0")]
    [InlineData("--=x", "--=x")]
    [InlineData("-x=1", "-x=1")]                                    // a short switch: the host would refuse it as a configuration error (78)
    [InlineData("=foo", "=foo")]                                    // no key
    public async Task Invoke_UnknownVerb_Exit2WithoutRunningTheDaemon(string commandLine, string stray)
    {
        (int exit, string[]? hostArgs) = await InvokeAsync(commandLine.Split(' '));
        Assert.Equal(2, exit);
        Assert.Null(hostArgs);
        Assert.Contains($"unknown command or argument '{stray}'", Output, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Invoke_SettingWithItsValueAsTheNextToken_RunsDaemon()
    {
        (int exit, string[]? hostArgs) = await InvokeAsync("--Nbd:Mappings:0:Uri", "nbd://127.0.0.1/data", "Serilog:MinimumLevel:Default=Debug");
        Assert.Equal(42, exit);
        Assert.Equal(3, Assert.IsType<string[]>(hostArgs).Length);
    }

    [Fact]
    public async Task Invoke_LastSettingWithoutValue_Exit2NamingIt()
    {
        // The host's command-line provider drops a last "--Key" without a word: ReadOnly would silently stay false.
        (int exit, string[]? hostArgs) = await InvokeAsync("--Nbd:Mappings:0:Uri=nbd://127.0.0.1/data", "--Nbd:Mappings:0:ReadOnly");
        Assert.Equal(2, exit);
        Assert.Null(hostArgs);
        Assert.Contains("setting '--Nbd:Mappings:0:ReadOnly' has no value", Output, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("check")]                                   // the device argument missing
    [InlineData("connect", "nbd://h/x", "--interface", "nl")] // a value the option does not take
    [InlineData("list", "nbd://h/x", "--bogus")]           // an unknown option of a verb
    public async Task Invoke_VerbCommandLineRefused_Exit2(params string[] args)
    {
        (int exit, string[]? hostArgs) = await InvokeAsync(args);
        Assert.Equal(2, exit);
        Assert.Null(hostArgs);
        Assert.Contains("see nbd-daemon --help", Output, StringComparison.Ordinal);
    }

    /// <summary>
    /// The parser took "--foo" for a verb's DEVICE and blamed the device ("unknown option or argument '/dev/nbd0' for
    /// check", "'--foo' is not an nbd device"); a bad option value came out as a .NET type name.
    /// </summary>
    [Theory]
    [InlineData("nbd-daemon: unknown option '--foo' for check", "check", "--foo")]
    [InlineData("nbd-daemon: unknown option '--json' for check", "check", "--json", "/dev/nbd0")]
    [InlineData("nbd-daemon: unknown option '-x' for disconnect", "disconnect", "-x", "/dev/nbd0")]
    [InlineData("nbd-daemon: unknown option '--bogus=1' for list", "list", "nbd://h/x", "--bogus=1")]
    [InlineData("--timeout: 'abc' is not a whole number of seconds (0 to 86400)", "connect", "nbd://h/x", "--timeout", "abc")]
    [InlineData("--block-size: '4k' is not a number of bytes (a power of two from 512 to 4096)", "connect", "nbd://h/x", "--block-size", "4k")]
    [InlineData("--interface: 'nl' is not an interface: ioctl or netlink", "connect", "nbd://h/x", "--interface", "nl")]
    public async Task Invoke_VerbCommandLineRefused_NamesTheCulprit(string expected, params string[] args)
    {
        (int exit, _) = await InvokeAsync(args);

        Assert.Equal(2, exit);
        Assert.Contains(expected, Output, StringComparison.Ordinal);
        Assert.DoesNotContain("System.", Output, StringComparison.Ordinal);
        Assert.DoesNotContain("is not an nbd device", Output, StringComparison.Ordinal);
    }

    [Fact]
    public void ConnectInterface_AnyCase_AsTheConfigurationTakesIt()
    {
        RootCommand root = Program.CreateRootCommand((_, _) => Task.FromResult(0));
        ParseResult parsed = root.Parse(["connect", "nbd://h/x", "--interface", "NETLINK"]);

        Assert.Empty(parsed.Errors);
        Assert.Equal("netlink", parsed.GetValue<string>("--interface"));
    }

    /// <summary>With standard error refusing, a usage error is still exit 2 (it was an unhandled exception, then SIGABRT).</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Invoke_UsageErrorWithStandardErrorRefusing_StillExit2(bool closed)
    {
        RootCommand root = Program.CreateRootCommand((_, _) => Task.FromResult(42));

        int exit = await Program.InvokeAsync(root, ["check"], new InvocationConfiguration { Output = new StringWriter(), Error = new RefusingWriter(closed), ProcessTerminationTimeout = null });

        Assert.Equal(2, exit);
    }
}

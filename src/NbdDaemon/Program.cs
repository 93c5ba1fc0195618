using System.CommandLine;
using NbdDaemon.Hosting;

namespace NbdDaemon;

internal static class Program
{
    public static Task<int> Main(string[] args)
    {
        // No ProcessTerminationTimeout: SIGTERM/SIGINT belong to the host's lifetime, which stops the mappings
        // in order; System.CommandLine's own handler would cancel and then force-exit mid-teardown.
        var invocation = new InvocationConfiguration { ProcessTerminationTimeout = null };
        return CreateRootCommand(DaemonHost.RunAsync).Parse(args).InvokeAsync(invocation);
    }

    /// <summary>
    /// The command tree. No verb (or <c>run</c>) runs the daemon; every token the parser does not know
    /// (e.g. <c>--Nbd:Mappings:0:Uri=nbd://…</c>) is passed on to the host's command-line configuration.
    /// </summary>
    /// <param name="runDaemon">The daemon entry; injected so tests can see the host arguments without starting it.</param>
    internal static RootCommand CreateRootCommand(Func<string[], TextWriter, Task<int>> runDaemon)
    {
        var root = new RootCommand("nbd-daemon: maps NBD exports to /dev/nbdN block devices and keeps them connected.")
        {
            TreatUnmatchedTokensAsErrors = false,
        };
        root.SetAction(parseResult => runDaemon([.. parseResult.UnmatchedTokens], parseResult.InvocationConfiguration.Error));

        var run = new Command("run", "Run the daemon (the default when no verb is given). Host settings: --Nbd:Mappings:0:Uri=…")
        {
            TreatUnmatchedTokensAsErrors = false,
        };
        run.SetAction(parseResult => runDaemon([.. parseResult.UnmatchedTokens], parseResult.InvocationConfiguration.Error));
        root.Subcommands.Add(run);

        // Verbs owned by the CLI work; each is a static factory in Cli/ returning a System.CommandLine.Command:
        // root.Subcommands.Add(Cli.ListCommand.Create());
        // root.Subcommands.Add(Cli.ConnectCommand.Create());
        // root.Subcommands.Add(Cli.DisconnectCommand.Create());
        // root.Subcommands.Add(Cli.CheckCommand.Create());
        return root;
    }
}

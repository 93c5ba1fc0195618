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
        return InvokeAsync(CreateRootCommand(DaemonHost.RunAsync), args, invocation);
    }

    /// <summary>
    /// Parses and runs. A command line the parser refuses (a verb's missing argument, a bad option value, an unknown
    /// option, which the parser lets through since the root takes unknown tokens for the host) exits <see cref="Cli.CliExit.Usage"/> (2) as the README says, not System.CommandLine's 1, which for
    /// <c>check</c> means "not connected".
    /// </summary>
    internal static async Task<int> InvokeAsync(RootCommand root, string[] args, InvocationConfiguration invocation)
    {
        // --help and --version write through the invocation's output: a refusal there (ENOSPC, a closed terminal) is a
        // message and exit 1, not System.CommandLine's "Unhandled exception" with a stack trace.
        var output = new GuardedOutput(invocation.Output, invocation.Error);
        invocation.Output = output;
        // A command line that does not start with a verb or one of the root's options is the daemon's, whatever follows:
        // "--Key Value" takes the next token as its value even when that is a verb's name ("--Nbd:Mappings:0:Name run"),
        // which the parser would otherwise take as the verb.
        if (args is [string first, ..] && !root.Subcommands.Any(c => c.Name == first)
            && !root.Options.Any(o => o.Name == first || o.Aliases.Contains(first)))
        {
            args = ["run", .. args];
        }

        ParseResult parsed = root.Parse(args);
        // The daemon's own tokens are host settings (checked by its action); a verb has none it does not know.
        bool daemon = parsed.CommandResult.Command == root || parsed.CommandResult.Command.Name == "run";
        if (!daemon && UnknownOption(root, parsed.CommandResult.Command, args) is string unknown)
        {
            // The parser takes "--foo" for the verb's DEVICE when that slot is free, and then blames the real device
            // ("unknown option or argument '/dev/nbd0'", or "'--foo' is not an nbd device"): name the option, as getopt does.
            Cli.CliExit.TryWriteLine(invocation.Error, $"nbd-daemon: unknown option '{unknown}' for {parsed.CommandResult.Command.Name}");
            Cli.CliExit.TryWriteLine(invocation.Error, "nbd-daemon: see nbd-daemon --help");
            return Cli.CliExit.Usage;
        }

        if (parsed.Errors.Count == 0 && (daemon || parsed.UnmatchedTokens.Count == 0))
        {
            int exit = await parsed.InvokeAsync(invocation);
            return output.Failed ? Cli.CliExit.Failed : exit;
        }

        foreach (var error in parsed.Errors)
        {
            Cli.CliExit.TryWriteLine(invocation.Error, $"nbd-daemon: {error.Message}");
        }

        if (!daemon)
        {
            foreach (string token in parsed.UnmatchedTokens)
            {
                Cli.CliExit.TryWriteLine(invocation.Error, $"nbd-daemon: unknown option or argument '{token}' for {parsed.CommandResult.Command.Name}");
            }
        }

        Cli.CliExit.TryWriteLine(invocation.Error, "nbd-daemon: see nbd-daemon --help");
        return Cli.CliExit.Usage;
    }

    /// <summary>
    /// The first token after the verb that looks like an option (<c>--x</c>, or <c>-</c> and a letter: "-5" is a value) and
    /// is none of the verb's or the root's; null when there is none. Tokens after "--" are arguments.
    /// </summary>
    private static string? UnknownOption(RootCommand root, Command verb, string[] args)
    {
        var known = new HashSet<string>(StringComparer.Ordinal);
        foreach (Option option in verb.Options.Concat(root.Options))
        {
            known.Add(option.Name);
            known.UnionWith(option.Aliases);
        }

        foreach (string token in args.SkipWhile(a => a != verb.Name).Skip(1).TakeWhile(a => a != "--"))
        {
            string name = token.Split('=', 2)[0];
            bool optionLike = token.StartsWith("--", StringComparison.Ordinal) || (token.Length > 1 && token[0] == '-' && char.IsLetter(token[1]));
            if (optionLike && !known.Contains(name))
            {
                return token;
            }
        }

        return null;
    }

    /// <summary>Standard output for System.CommandLine's own text; the first refused write is told on standard error, the rest dropped.</summary>
    private sealed class GuardedOutput(TextWriter inner, TextWriter error) : TextWriter
    {
        public bool Failed { get; private set; }

        public override System.Text.Encoding Encoding => inner.Encoding;

        public override void Write(char value) => Guard(() => inner.Write(value));

        public override void Write(string? value) => Guard(() => inner.Write(value));

        public override void Write(char[] buffer, int index, int count) => Guard(() => inner.Write(buffer, index, count));

        public override void WriteLine(string? value) => Guard(() => inner.WriteLine(value));

        public override void Flush() => Guard(inner.Flush);

        private void Guard(Action write)
        {
            if (Failed)
            {
                return;
            }

            try
            {
                write();
            }
            catch (Exception e) when (Cli.OutputFailedException.IsRefusal(e))
            {
                Failed = true;
                Cli.CliExit.Error(error, Cli.OutputFailedException.Describe(e));
            }
        }
    }

    /// <summary>
    /// What is wrong with the daemon's command line, or null: a token that is neither a setting (<c>--Key=Value</c>,
    /// <c>--Key Value</c>, <c>/Key=Value</c>, <c>Key=Value</c>) nor its value, such as a mistyped verb
    /// (<c>nbd-daemon disconect /dev/nbd0</c>) or a forgotten one (<c>nbd-daemon /dev/nbd0</c>: no setting's name has a
    /// '/'), would otherwise start the whole daemon with every configured mapping; a last <c>--Key</c> with no value
    /// would be dropped by the host's command-line provider without a word.
    /// </summary>
    internal static string? CommandLineError(IReadOnlyList<string> tokens)
    {
        for (int i = 0; i < tokens.Count; i++)
        {
            string token = tokens[i];
            bool dashes = token.StartsWith("--", StringComparison.Ordinal);
            if (dashes || token.StartsWith('/'))
            {
                int equals = token.IndexOf('=', StringComparison.Ordinal);
                string key = token[(dashes ? 2 : 1)..(equals < 0 ? token.Length : equals)];
                if (key.Length == 0 || key.Contains('/', StringComparison.Ordinal))
                {
                    return $"unknown command or argument '{token}'";
                }

                if (equals < 0 && ++i == tokens.Count) // "--Key Value": the next token is its value
                {
                    return $"setting '{token}' has no value (--Key=Value or --Key Value)";
                }

                continue;
            }

            // Key=Value: not "=value" (no key), and not "-x=1" (a short switch, which the host's provider refuses only
            // after the command line was accepted, as a configuration error: exit 78 instead of 2).
            if (!token.Contains('=', StringComparison.Ordinal) || token.StartsWith('=') || token.StartsWith('-'))
            {
                return $"unknown command or argument '{token}'";
            }
        }

        return null;
    }

    private static Task<int> RunDaemonChecked(ParseResult parseResult, Func<string[], TextWriter, Task<int>> runDaemon)
    {
        string[] tokens = [.. parseResult.UnmatchedTokens];
        TextWriter stderr = parseResult.InvocationConfiguration.Error;
        return CommandLineError(tokens) is string error
            ? Task.FromResult(Cli.CliExit.UsageError(stderr, $"{error}: the verbs are run, list, connect, disconnect and check; daemon settings are --Key=Value (see nbd-daemon --help)"))
            : runDaemon(tokens, stderr);
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
        root.SetAction(parseResult => RunDaemonChecked(parseResult, runDaemon));

        var run = new Command("run", "Run the daemon (the default when no verb is given). Host settings: --Nbd:Mappings:0:Uri=…")
        {
            TreatUnmatchedTokensAsErrors = false,
        };
        run.SetAction(parseResult => RunDaemonChecked(parseResult, runDaemon));
        root.Subcommands.Add(run);

        // The one-shot verbs for humans; each is a static factory in Cli/.
        root.Subcommands.Add(Cli.ListCommand.Create());
        root.Subcommands.Add(Cli.ConnectCommand.Create());
        root.Subcommands.Add(Cli.DisconnectCommand.Create());
        root.Subcommands.Add(Cli.CheckCommand.Create());
        return root;
    }
}

using System.Diagnostics;
using System.Net.Sockets;
using NbdDaemon.Cli;
using TestSupport;

namespace NbdDaemon.Tests.Cli;

/// <summary>`nbd-daemon list` against a real nbdkit whose export names and description carry control characters.</summary>
public sealed class ListCommandTests : IDisposable
{
    private readonly TempDirectory _dir = new();
    private Process? _server;

    [Fact]
    public async Task RunAsync_NamesWithControlCharacters_OneEscapedLinePerExport()
    {
        string socket = await StartNbdkitAsync("ta\tb", "nl\nx", "esc\u001b[31mred", "back\\slash", "plain");
        var stdout = new StringWriter();
        var stderr = new StringWriter();

        int exit = await ListCommand.RunAsync($"nbd+unix:///?socket={socket}", json: false, stdout, stderr, CancellationToken.None);

        Assert.True(exit == 0, stderr.ToString());
        // Before: the TAB split a name from the description, the newline split the record, ESC reached the terminal.
        Assert.Equal(
            [@"ta\u0009b	desc\u000aline2", @"nl\u000ax	desc\u000aline2", @"esc\u001b[31mred	desc\u000aline2", @"back\u005cslash	desc\u000aline2", @"plain	desc\u000aline2"],
            stdout.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries));
    }

    [Fact]
    public async Task RunAsync_Json_ExactStrings()
    {
        string socket = await StartNbdkitAsync("ta\tb");
        var stdout = new StringWriter();

        int exit = await ListCommand.RunAsync($"nbd+unix:///?socket={socket}", json: true, stdout, new StringWriter(), CancellationToken.None);

        Assert.Equal(0, exit);
        Assert.Equal("""[{"name":"ta\tb","description":"desc\nline2"}]""", stdout.ToString().TrimEnd('\n'));
    }

    /// <summary>One export name that is not UTF-8 (bytes 0xFF 0xFE) failed the whole listing: every export is listed now, that one marked.</summary>
    [Fact]
    public async Task RunAsync_OneNameNotUtf8_EveryExportListedThatOneNoted()
    {
        string socket = await StartNbdkitWithPrintfNameAsync(@"bad\377\376", "good");
        var stdout = new StringWriter();
        var stderr = new StringWriter();

        int exit = await ListCommand.RunAsync($"nbd+unix:///?socket={socket}", json: false, stdout, stderr, CancellationToken.None);

        Assert.Equal(0, exit);
        Assert.Equal(["good\tdesc\\u000aline2", "bad\ufffd\ufffd\tdesc\\u000aline2"], stdout.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.Equal(
            "nbd-daemon: note: the server lists an export whose name is not valid UTF-8 or contains NUL, shown as 'bad\ufffd\ufffd' (U+FFFD for each bad byte); it cannot be asked for by name\n",
            stderr.ToString());
    }

    /// <summary>
    /// A failed listing in the daemon's words: it said "Cannot connect to 127.0.0.1:1: ConnectionRefused (Connection
    /// refused 127.0.0.1:1). (server 127.0.0.1:1, export '')", naming an export a listing has none of.
    /// </summary>
    [Fact]
    public async Task RunAsync_ServerRefusesTheConnection_SaysSoInTheDaemonsWords()
    {
        var stderr = new StringWriter();

        int exit = await ListCommand.RunAsync("nbd://127.0.0.1:1", json: false, new StringWriter(), stderr, CancellationToken.None);

        Assert.Equal(1, exit);
        Assert.Equal("nbd-daemon: nbd://127.0.0.1:1/: connection refused\n", stderr.ToString());
    }

    /// <summary>An export name in the URI was ignored without a word: whoever typed it may have expected that export only.</summary>
    [Fact]
    public async Task RunAsync_UriNamesAnExport_ListsEveryExportAndSaysTheNameWasIgnored()
    {
        string socket = await StartNbdkitAsync("plain");
        var stdout = new StringWriter();
        var stderr = new StringWriter();

        int exit = await ListCommand.RunAsync($"nbd+unix:///other?socket={socket}", json: false, stdout, stderr, CancellationToken.None);

        Assert.Equal(0, exit);
        Assert.Equal("plain\tdesc\\u000aline2\n", stdout.ToString());
        Assert.Equal("nbd-daemon: note: the export 'other' in the URI is ignored: list shows every export of the server\n", stderr.ToString());
    }

    /// <summary>Standard output refused (ENOSPC behind a redirection to a full disk): a message, exit 1, no stack trace.</summary>
    [Fact]
    public async Task RunAsync_StandardOutputRefuses_Exit1WithAMessage()
    {
        string socket = await StartNbdkitAsync("plain");
        var stderr = new StringWriter();

        int exit = await ListCommand.RunAsync($"nbd+unix:///?socket={socket}", json: false, new RefusingWriter(), stderr, CancellationToken.None);

        Assert.Equal(1, exit);
        Assert.Equal("nbd-daemon: writing to standard output failed (No space left on device)\n", stderr.ToString());
    }

    /// <summary>`check` answers with its exit code (0 connected, 1 not): a refused standard output does not change it.</summary>
    [Theory]
    [InlineData(true, 0, false)]
    [InlineData(false, 1, false)]
    [InlineData(true, 0, true)]
    [InlineData(false, 1, true)]
    public void CheckCommand_StandardOutputRefuses_ExitCodeStillTheStateRefusalOnStderr(bool connected, int expected, bool closed)
    {
        string sysBlock = _dir.File("sys-block");
        Directory.CreateDirectory(Path.Combine(sysBlock, "nbd3", "queue"));
        File.WriteAllText(Path.Combine(sysBlock, "nbd3", "size"), connected ? "131072\n" : "0\n");
        File.WriteAllText(Path.Combine(sysBlock, "nbd3", "queue", "logical_block_size"), "4096\n");
        if (connected)
        {
            File.WriteAllText(Path.Combine(sysBlock, "nbd3", "pid"), "4242\n");
        }

        var stderr = new StringWriter();

        var output = new RefusingWriter(closed);

        int exit = CheckCommand.Run("/dev/nbd3", sysBlock, output, stderr);

        Assert.Equal(expected, exit);
        Assert.Equal(output.Said, stderr.ToString());
    }

    public void Dispose()
    {
        if (_server is { HasExited: false } server)
        {
            server.Kill();
            server.WaitForExit(5000);
        }

        _server?.Dispose();
        _dir.Dispose();
    }

    private Task<string> StartNbdkitAsync(params string[] names) => StartNbdkitWithPrintfNameAsync(null, names);

    /// <param name="printfName">An extra export name made by the shell's printf (bytes a .NET string cannot carry).</param>
    /// <param name="names">Export names.</param>
    private async Task<string> StartNbdkitWithPrintfNameAsync(string? printfName, params string[] names)
    {
        string socket = _dir.File("nbdkit.sock");
        string log = _dir.File("nbdkit.log");
        var start = new ProcessStartInfo("sh") { UseShellExecute = false };
        string extra = printfName is null ? "" : $" \"exportname=$(printf '{printfName}')\"";
        var args = new List<string> { "-c", $"exec nbdkit \"$@\"{extra} 2>>\"$0\" >&2", log, "--foreground", "-U", socket, "--filter=exportname", "memory", "1M", "exportname-list=explicit", "exportdesc=fixed:desc\nline2" };
        args.AddRange(names.Select(n => "exportname=" + n));
        foreach (string arg in args)
        {
            start.ArgumentList.Add(arg);
        }

        _server = ProcessLauncher.Start(start);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(15);
        while (DateTime.UtcNow < deadline && !_server.HasExited)
        {
            if (File.Exists(socket))
            {
                using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await probe.ConnectAsync(new UnixDomainSocketEndPoint(socket));
                    return socket;
                }
                catch (SocketException)
                {
                    // not accepting yet
                }
            }

            await Task.Delay(50);
        }

        throw new InvalidOperationException($"nbdkit did not accept on {socket}: {(File.Exists(log) ? File.ReadAllText(log) : "no log")}");
    }
}

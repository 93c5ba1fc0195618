using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text;
using TestSupport;

namespace Nbd.Protocol.Tests.Interop.Support;

/// <summary>The server did not come up; carries what it printed so the test failure says why.</summary>
internal sealed class ServerStartException(string message) : Exception(message);

/// <summary>
/// One real NBD server process, started as the leader of its own process group (setsid) and stopped by signalling
/// that group, so nothing it forked outlives the fixture. Ready means "accepts a connection on its endpoint".
/// </summary>
internal sealed class ServerProcess : IAsyncDisposable
{
    private static readonly TimeSpan ReadyTimeout = TimeSpan.FromSeconds(15);
    private readonly Process? _launcher;
    private readonly StringBuilder _output;

    private ServerProcess(string name, int processGroup, Process? launcher, StringBuilder output)
    {
        Name = name;
        ProcessGroup = processGroup;
        _launcher = launcher;
        _output = output;
    }

    public string Name { get; }

    public int ProcessGroup { get; }

    public string Output
    {
        get
        {
            lock (_output)
            {
                return _output.ToString();
            }
        }
    }

    /// <summary>Starts a server that stays in the foreground; its pid is its process group.</summary>
    public static async Task<ServerProcess> StartForegroundAsync(string name, string tool, IReadOnlyList<string> args, EndPoint readyAt)
    {
        var (process, output) = Launch(tool, args);
        var server = new ServerProcess(name, process.Id, process, output);
        try
        {
            await server.WaitUntilAcceptingAsync(readyAt);
            return server;
        }
        catch
        {
            await server.DisposeAsync();
            throw;
        }
    }

    /// <summary>
    /// Starts a server that daemonizes itself (nbd-server: in -d mode it serves one session and exits, which no
    /// fixture shared by several tests can use). daemon(3) makes the child a session and group leader; its pid
    /// comes from the pid file.
    /// </summary>
    public static async Task<ServerProcess> StartDaemonAsync(string name, string tool, IReadOnlyList<string> args, string pidFile, EndPoint readyAt)
    {
        var (launcher, output) = Launch(tool, args);
        using (launcher)
        {
            using var cts = new CancellationTokenSource(ReadyTimeout);
            try
            {
                await launcher.WaitForExitAsync(cts.Token);
            }
            catch (OperationCanceledException)
            {
                launcher.Kill(entireProcessTree: true);
                throw new ServerStartException($"{name}: launcher did not exit within {ReadyTimeout}. Output:\n{output}");
            }

            if (launcher.ExitCode != 0)
            {
                throw new ServerStartException($"{name}: '{tool} {string.Join(' ', args)}' exited with {launcher.ExitCode}. Output:\n{output}");
            }
        }

        int pid = await ReadPidFileAsync(name, pidFile, output);
        var server = new ServerProcess(name, pid, null, output);
        try
        {
            await server.WaitUntilAcceptingAsync(readyAt);
            return server;
        }
        catch
        {
            await server.DisposeAsync();
            throw;
        }
    }

    /// <summary>
    /// Runs <paramref name="start"/> with a fresh free port, retrying when the server could not bind it (another
    /// process may grab a port between our probe and the server's bind).
    /// </summary>
    public static async Task<T> OnFreePortAsync<T>(Func<int, Task<T>> start)
    {
        ServerStartException? last = null;
        for (int attempt = 0; attempt < 3; attempt++)
        {
            try
            {
                return await start(FreePort.Pick());
            }
            catch (ServerStartException ex)
            {
                last = ex;
            }
        }

        throw last!;
    }

    private static (Process Process, StringBuilder Output) Launch(string tool, IReadOnlyList<string> args)
    {
        // setsid (util-linux) execs the tool directly when the caller is not a group leader, so pid == pgid.
        var info = new ProcessStartInfo(ExternalTool.Require("setsid", "util-linux"))
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        info.ArgumentList.Add(tool);
        foreach (string arg in args)
        {
            info.ArgumentList.Add(arg);
        }

        var output = new StringBuilder();
        var process = new Process { StartInfo = info };
        DataReceivedEventHandler append = (_, e) =>
        {
            if (e.Data is not null)
            {
                lock (output)
                {
                    output.AppendLine(e.Data);
                }
            }
        };
        process.OutputDataReceived += append;
        process.ErrorDataReceived += append;
        // Not process.Start(): nbdkit dies with the thread that started it (see ProcessLauncher).
        ProcessLauncher.Start(process);
        process.StandardInput.Close();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return (process, output);
    }

    private static async Task<int> ReadPidFileAsync(string name, string pidFile, StringBuilder output)
    {
        var deadline = DateTime.UtcNow + ReadyTimeout;
        while (DateTime.UtcNow < deadline)
        {
            if (File.Exists(pidFile)
                && int.TryParse((await File.ReadAllTextAsync(pidFile)).Trim(), NumberStyles.None, CultureInfo.InvariantCulture, out int pid)
                && pid > 1)
            {
                return pid;
            }

            await Task.Delay(25);
        }

        throw new ServerStartException($"{name}: no pid in {pidFile} after {ReadyTimeout}. Output:\n{output}");
    }

    private async Task WaitUntilAcceptingAsync(EndPoint endPoint)
    {
        var deadline = DateTime.UtcNow + ReadyTimeout;
        SocketException? last = null;
        while (DateTime.UtcNow < deadline)
        {
            // A launched process may not have reached setsid() yet (its group is still ours), so ask the process
            // itself while we have it; a daemon we only know by its group.
            bool alive = _launcher is not null ? !_launcher.HasExited : ProcessGroups.Members(ProcessGroup).Count > 0;
            if (!alive)
            {
                throw new ServerStartException($"{Name}: exited before accepting on {endPoint}. Output:\n{Output}");
            }

            using var probe = endPoint is UnixDomainSocketEndPoint
                ? new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified)
                : new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(1));
                await probe.ConnectAsync(endPoint, cts.Token);
                return;
            }
            catch (SocketException ex)
            {
                last = ex;
            }
            catch (OperationCanceledException)
            {
            }

            await Task.Delay(25);
        }

        throw new ServerStartException($"{Name}: not accepting on {endPoint} after {ReadyTimeout} ({last?.SocketErrorCode}). Output:\n{Output}");
    }

    public async ValueTask DisposeAsync()
    {
        IReadOnlyList<int> left = ProcessGroup > 1
            ? await ProcessGroups.TerminateAsync(ProcessGroup, TimeSpan.FromSeconds(5))
            : [];
        if (_launcher is not null && !_launcher.HasExited)
        {
            // Still before setsid(), so the group signal missed it.
            _launcher.Kill();
        }

        if (_launcher is not null)
        {
            // Reap the leader so it does not linger as a zombie of the test host.
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(5));
            try
            {
                await _launcher.WaitForExitAsync(cts.Token);
            }
            catch (OperationCanceledException)
            {
            }

            _launcher.Dispose();
        }

        if (left.Count > 0)
        {
            throw new InvalidOperationException($"{Name}: processes {string.Join(", ", left)} of group {ProcessGroup} survived SIGKILL.");
        }
    }
}

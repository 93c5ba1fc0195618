using System.Collections.Concurrent;
using System.Diagnostics;

namespace TestSupport;

/// <summary>
/// Starts child processes from one thread that lives as long as the test process.
/// </summary>
/// <remarks>
/// Why: nbdkit (1.32, Debian) sets PR_SET_PDEATHSIG(SIGTERM) on itself even without --exit-with-parent, and Linux
/// sends that signal when the *thread* that forked the child ends, not the process. A test that starts nbdkit from
/// whichever pool or LongRunning thread it is on loses the server at random, 20 ms or 20 s later, as soon as that
/// thread retires: nbdkit exits with status 0 and says nothing (seen as "did not accept within 15 s" and as a greeting
/// cut short). Found with the signal_generate tracepoint (do_exit → do_send_sig_info) and prctl(PR_SET_PDEATHSIG).
/// </remarks>
internal static class ProcessLauncher
{
    private static readonly BlockingCollection<(Func<Process> Start, TaskCompletionSource<Process> Started)> Requests = CreateLauncher();

    /// <summary><see cref="Process.Start(ProcessStartInfo)"/> on the launcher thread.</summary>
    public static Process Start(ProcessStartInfo info) =>
        Run(() => Process.Start(info) ?? throw new InvalidOperationException($"{info.FileName} did not start"));

    /// <summary><see cref="Process.Start()"/> of a configured process (event handlers attached) on the launcher thread.</summary>
    public static void Start(Process process) => Run(() =>
    {
        process.Start();
        return process;
    });

    /// <summary>Runs <paramref name="start"/> (which starts a process and returns it) on the launcher thread.</summary>
    public static Process Start(Func<Process> start) => Run(start);

    private static Process Run(Func<Process> start)
    {
        var started = new TaskCompletionSource<Process>(TaskCreationOptions.RunContinuationsAsynchronously);
        Requests.Add((start, started));
        return started.Task.GetAwaiter().GetResult();
    }

    private static BlockingCollection<(Func<Process>, TaskCompletionSource<Process>)> CreateLauncher()
    {
        var requests = new BlockingCollection<(Func<Process>, TaskCompletionSource<Process>)>();
        var thread = new Thread(() =>
        {
            foreach ((Func<Process> start, TaskCompletionSource<Process> started) in requests.GetConsumingEnumerable())
            {
                try
                {
                    started.SetResult(start());
                }
#pragma warning disable CA1031 // Handed to the caller, whatever it is.
                catch (Exception e)
#pragma warning restore CA1031
                {
                    started.SetException(e);
                }
            }
        })
        {
            IsBackground = true,
            Name = "process launcher",
        };
        thread.Start();
        return requests;
    }
}

using Nbd.Protocol;

namespace NbdDaemon.Cli;

/// <summary>Exit codes of the one-shot verbs, documented in the README.</summary>
internal static class CliExit
{
    public const int Ok = 0;

    /// <summary>The operation failed (server, network or kernel); stderr names the cause.</summary>
    public const int Failed = 1;

    /// <summary>The command line itself is wrong (bad URI, device name, block size…).</summary>
    public const int Usage = 2;

    public static int Error(TextWriter stderr, string message) => Tell(stderr, message, Failed);

    /// <summary>
    /// A connect, handshake or listing that failed, in the daemon's words (<see cref="Mappings.FailureText.Describe(Exception)"/>:
    /// "server refused: NBD_REP_ERR_UNKNOWN, no such export", "no such socket file (ENOENT): is the server running, and
    /// is PATH where it listens?").
    /// </summary>
    public static int ServerFailure(TextWriter stderr, NbdUri uri, NbdException e) => Error(stderr, $"{uri}: {Mappings.FailureText.Describe(e)}");

    public static int UsageError(TextWriter stderr, string message) => Tell(stderr, message, Usage);

    /// <summary>A remark on standard error that changes nothing (best effort, as every message).</summary>
    public static void Note(TextWriter stderr, string message) => Tell(stderr, "note: " + message, Ok);

    /// <summary>The message on standard error, if it can still be written (a closed terminal fails with EIO): the exit code says the rest.</summary>
    private static int Tell(TextWriter stderr, string message, int exit)
    {
        TryWriteLine(stderr, $"nbd-daemon: {message}");
        return exit;
    }

    /// <summary>
    /// One line on standard error if it can still be written: closed (EBADF), full (ENOSPC) or a terminal gone (EIO) lose
    /// the line, and the exit code still says what happened (a configuration error stays 78, which systemd does not
    /// restart; an exception here would end the process with SIGABRT, 134, which it does).
    /// </summary>
    public static void TryWriteLine(TextWriter stderr, string line)
    {
        try
        {
            stderr.WriteLine(line);
            stderr.Flush();
        }
        catch (Exception e) when (OutputFailedException.IsRefusal(e))
        {
            // Nobody to tell.
        }
    }
}

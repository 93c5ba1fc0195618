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

    public static int UsageError(TextWriter stderr, string message) => Tell(stderr, message, Usage);

    /// <summary>The message on standard error, if it can still be written (a closed terminal fails with EIO): the exit code says the rest.</summary>
    private static int Tell(TextWriter stderr, string message, int exit)
    {
        try
        {
            stderr.WriteLine($"nbd-daemon: {message}");
            stderr.Flush();
        }
        catch (Exception e) when (OutputFailedException.IsRefusal(e))
        {
            // Nobody to tell.
        }

        return exit;
    }
}

namespace NbdDaemon.Cli;

/// <summary>
/// The verbs' lines to standard output, flushed one by one: a refusal (ENOSPC behind a redirection to a full disk, EIO
/// from a terminal that was closed) becomes <see cref="OutputFailedException"/>, which each verb turns into a message
/// on standard error instead of an unhandled exception and its stack trace. (EPIPE never gets here: .NET's console
/// stream ignores it, so `list | head` ends quietly.)
/// </summary>
internal static class StandardOutput
{
    public static void WriteLine(TextWriter stdout, string line)
    {
        try
        {
            stdout.WriteLine(line);
            stdout.Flush();
        }
        catch (Exception e) when (OutputFailedException.IsRefusal(e))
        {
            throw new OutputFailedException(OutputFailedException.Cause(e).Message, e);
        }
    }
}

/// <summary>Standard output refused a line: told apart from every other I/O failure (a sysfs read, say).</summary>
internal sealed class OutputFailedException(string message, Exception inner) : Exception(message, inner)
{
    /// <summary>What every verb says on standard error about it.</summary>
    public string Text => Describe(InnerException ?? this);

    /// <summary>The same words for a refusal caught outside a verb (--help, --version).</summary>
    public static string Describe(Exception refusal) => $"writing to standard output failed ({Cause(refusal).Message})";

    /// <summary>
    /// Whether <paramref name="e"/> is a console stream refusing a write: an IOException (ENOSPC, EIO), or for EBADF
    /// (standard output closed: <c>nbd-daemon list URI &gt;&amp;-</c>) .NET's UnauthorizedAccessException around one.
    /// </summary>
    public static bool IsRefusal(Exception e) => e is IOException or UnauthorizedAccessException { InnerException: IOException };

    /// <summary>The IOException that says what the system refused ("Bad file descriptor", not "Access to the path is denied").</summary>
    public static Exception Cause(Exception refusal) => refusal is UnauthorizedAccessException { InnerException: IOException io } ? io : refusal;
}

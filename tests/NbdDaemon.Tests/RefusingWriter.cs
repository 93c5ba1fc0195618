namespace NbdDaemon.Tests;

/// <summary>
/// What a refused standard output does to every write: a redirection to a full disk (ENOSPC, an IOException), or with
/// <paramref name="closed"/> a closed one (<c>&gt;&amp;-</c>: EBADF, which .NET's console stream throws as an
/// UnauthorizedAccessException around the IOException).
/// </summary>
internal sealed class RefusingWriter(bool closed = false) : StringWriter
{
    public override void Write(char value) => throw Refused();

    public override void Write(string? value) => throw Refused();

    public override void Write(char[] buffer, int index, int count) => throw Refused();

    public override void WriteLine(string? value) => throw Refused();

    /// <summary>What the verbs say about it.</summary>
    public string Said => $"nbd-daemon: writing to standard output failed ({(closed ? "Bad file descriptor" : "No space left on device")})\n";

    private Exception Refused() => closed
        ? new UnauthorizedAccessException("Access to the path is denied.", new IOException("Bad file descriptor"))
        : new IOException("No space left on device");
}

namespace NbdDaemon.Tests;

/// <summary>What a redirection to a full disk does to every write: ENOSPC.</summary>
internal sealed class RefusingWriter : StringWriter
{
    public override void Write(char value) => throw Refused();

    public override void Write(string? value) => throw Refused();

    public override void Write(char[] buffer, int index, int count) => throw Refused();

    public override void WriteLine(string? value) => throw Refused();

    private static IOException Refused() => new("No space left on device");
}

namespace Nbd.Protocol.Tests.Errors;

public sealed class NbdTextTests
{
    [Theory]
    [InlineData("plain disk", "plain disk")]
    [InlineData("é日😀 ß", "é日😀 ß")]
    [InlineData("a\tb\nc\u001b[31m\\", "a\\u0009b\\u000ac\\u001b[31m\\u005c")]
    [InlineData("evil\u202Etxt.exe", "evil\\u202etxt.exe")] // a bidirectional override would show "exe.txt" reversed
    [InlineData("x\u2028y\u2029z", "x\\u2028y\\u2029z")] // line and paragraph separators end a line in some viewers
    [InlineData("\u0085", "\\u0085")] // NEL, a C1 control
    public void Printable_EscapesWhatCouldForgeALineOrMoveTheCursor(string text, string expected) =>
        Assert.Equal(expected, NbdText.Printable(text));
}

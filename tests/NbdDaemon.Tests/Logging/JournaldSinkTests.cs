using System.Buffers.Binary;
using System.Text;
using Microsoft.Extensions.Logging;
using NbdDaemon.Logging;
using NbdDaemon.Mappings;
using Serilog;
using Serilog.Extensions.Logging;

namespace NbdDaemon.Tests.Logging;

public sealed class JournaldSinkTests
{
    /// <summary>Parses a native-protocol datagram; records which fields used the binary-safe form.</summary>
    private static (Dictionary<string, string> Fields, HashSet<string> Binary) Parse(byte[] datagram)
    {
        var fields = new Dictionary<string, string>(StringComparer.Ordinal);
        var binary = new HashSet<string>(StringComparer.Ordinal);
        int i = 0;
        while (i < datagram.Length)
        {
            int newline = Array.IndexOf(datagram, (byte)'\n', i);
            int equals = Array.IndexOf(datagram, (byte)'=', i, newline - i);
            if (equals >= 0)
            {
                string name = Encoding.ASCII.GetString(datagram, i, equals - i);
                fields.Add(name, Encoding.UTF8.GetString(datagram, equals + 1, newline - equals - 1));
                i = newline + 1;
            }
            else
            {
                string name = Encoding.ASCII.GetString(datagram, i, newline - i);
                ulong length = BinaryPrimitives.ReadUInt64LittleEndian(datagram.AsSpan(newline + 1, 8));
                int start = newline + 9;
                fields.Add(name, Encoding.UTF8.GetString(datagram, start, (int)length));
                Assert.Equal((byte)'\n', datagram[start + (int)length]);
                binary.Add(name);
                i = start + (int)length + 1;
            }
        }

        return (fields, binary);
    }

    [Fact]
    public async Task Emit_JournaldNotReading_NeverBlocksThenSaysHowManyWereDropped()
    {
        // A bound socket nobody reads: its queue fills (as a stopped or restarting journald's does).
        using var dir = new TempDirectory();
        using var journal = new DatagramListener(dir.File("journal"));
        using var sink = new JournaldSink(journal.Path);
        using Serilog.Core.Logger serilog = new LoggerConfiguration().MinimumLevel.Verbose().WriteTo.Sink(sink).CreateLogger();

        var emitting = new Thread(() =>
        {
            for (int i = 0; i < 3000; i++)
            {
                serilog.Information("record {Index}", i);
            }
        });
        emitting.Start();

        // Blocked for good before (a blocking send on a socket whose queue holds far fewer), with this thread in it.
        Assert.True(emitting.Join(TimeSpan.FromSeconds(10)), "Emit blocked on a journald that does not read");
        long dropped = sink.Dropped;
        Assert.InRange(dropped, 1, 2999);
        int delivered = 0;
        try
        {
            while (true)
            {
                journal.Receive(TimeSpan.FromMilliseconds(200));
                delivered++;
            }
        }
        catch (TimeoutException)
        {
        }

        Assert.Equal(3000, delivered + dropped);
        serilog.Information("after");
        (Dictionary<string, string> notice, _) = Parse(await journal.ReceiveAsync());
        Assert.Equal($"{dropped} log records dropped: journald was not reading", notice["MESSAGE"]);
        Assert.Equal("4", notice["PRIORITY"]);
        (Dictionary<string, string> after, _) = Parse(await journal.ReceiveAsync());
        Assert.Equal("after", after["MESSAGE"]);
        Assert.Equal(0, sink.Dropped);

    }

    [Fact]
    public async Task Emit_MappingTransitionThroughMicrosoftLogging_FieldsOnTheWire()
    {
        using var dir = new TempDirectory();
        using var journal = new DatagramListener(dir.File("journal"));
        using var sink = new JournaldSink(journal.Path);
        using Serilog.Core.Logger serilog = new LoggerConfiguration().MinimumLevel.Verbose().WriteTo.Sink(sink).CreateLogger();
        using var factory = new SerilogLoggerFactory(serilog);
        Microsoft.Extensions.Logging.ILogger logger = factory.CreateLogger("NbdDaemon.Mappings.MappingLoop");

        MappingLog.Transition(logger, LogLevel.Warning, new InvalidOperationException("refused\nsecond line"), "data", "/dev/nbd3",
            "10.0.0.5:10809", "disk", MappingState.Connecting, MappingState.Reconnecting, "; connection refused");

        (Dictionary<string, string> f, HashSet<string> binary) = Parse(await journal.ReceiveAsync());
        Assert.Equal("Mapping data on /dev/nbd3 (10.0.0.5:10809, export 'disk'): Connecting -> Reconnecting; connection refused", f["MESSAGE"]);
        Assert.Equal("4", f["PRIORITY"]);
        Assert.Equal("nbd-daemon", f["SYSLOG_IDENTIFIER"]);
        Assert.Equal("data", f["MAPPING"]);
        Assert.Equal("/dev/nbd3", f["DEVICE"]);
        Assert.Equal("10.0.0.5:10809", f["SERVER"]);
        Assert.Equal("disk", f["EXPORT"]);
        Assert.Equal("Reconnecting", f["STATE"]);
        Assert.Equal("Connecting", f["PREVIOUSSTATE"]);
        Assert.Equal("NbdDaemon.Mappings.MappingLoop", f["SOURCECONTEXT"]);
        Assert.StartsWith("System.InvalidOperationException: refused\nsecond line", f["EXCEPTION"], StringComparison.Ordinal);
        Assert.Contains("EXCEPTION", binary);
        Assert.DoesNotContain("MESSAGE", binary);
    }

    [Theory]
    [InlineData(Serilog.Events.LogEventLevel.Verbose, "7")]
    [InlineData(Serilog.Events.LogEventLevel.Debug, "7")]
    [InlineData(Serilog.Events.LogEventLevel.Information, "6")]
    [InlineData(Serilog.Events.LogEventLevel.Warning, "4")]
    [InlineData(Serilog.Events.LogEventLevel.Error, "3")]
    [InlineData(Serilog.Events.LogEventLevel.Fatal, "2")]
    public async Task Emit_Level_SyslogPriority(Serilog.Events.LogEventLevel level, string priority)
    {
        using var dir = new TempDirectory();
        using var journal = new DatagramListener(dir.File("journal"));
        using var sink = new JournaldSink(journal.Path);
        using Serilog.Core.Logger serilog = new LoggerConfiguration().MinimumLevel.Verbose().WriteTo.Sink(sink).CreateLogger();

        serilog.Write(level, "multi\nline {Count}", 3);

        (Dictionary<string, string> f, HashSet<string> binary) = Parse(await journal.ReceiveAsync());
        Assert.Equal(priority, f["PRIORITY"]);
        Assert.Equal("multi\nline 3", f["MESSAGE"]);
        Assert.Contains("MESSAGE", binary);
        Assert.Equal("3", f["COUNT"]);
    }

    [Theory]
    [InlineData("é")]
    [InlineData("€")]
    [InlineData("😀")]
    public void Format_ValueLongerThanTheCap_CutBeforeACharacterNotInsideIt(string character)
    {
        // The cap falls on the character's second byte.
        string message = new string('a', JournaldFormat.MaxValueBytes - 1) + character + " and the rest";
        var logEvent = new Serilog.Events.LogEvent(DateTimeOffset.UtcNow, Serilog.Events.LogEventLevel.Warning, null,
            new Serilog.Events.MessageTemplate([new Serilog.Parsing.TextToken(message)]), []);

        byte[] datagram = JournaldFormat.Format(logEvent, "nbd-daemon");

        Assert.True(datagram.AsSpan().StartsWith("MESSAGE="u8));
        int newline = Array.IndexOf(datagram, (byte)'\n');
        byte[] value = datagram["MESSAGE=".Length..newline];
        Assert.Equal(JournaldFormat.MaxValueBytes - 1, value.Length);
        Assert.Equal(new string('a', JournaldFormat.MaxValueBytes - 1), new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(value));
    }

    [Fact]
    public void Emit_JournaldAbsent_DoesNotThrow()
    {
        using var dir = new TempDirectory();
        using var sink = new JournaldSink(dir.File("missing"));
        using Serilog.Core.Logger serilog = new LoggerConfiguration().WriteTo.Sink(sink).CreateLogger();
        serilog.Information("nobody listens");
    }

    [Theory]
    [InlineData("Mapping", "MAPPING")]
    [InlineData("SourceContext", "SOURCECONTEXT")]
    [InlineData("_private", "PRIVATE")]
    [InlineData("weird-name.x", "WEIRD_NAME_X")]
    [InlineData("9lives", null)]
    [InlineData("___", null)]
    public void FieldName_Property_JournalRules(string property, string? expected) =>
        Assert.Equal(expected, JournaldFormat.FieldName(property));

    [Fact]
    public void UseJournald_OnlyWithJournalStreamNamingStderrAndSocket()
    {
        using var dir = new TempDirectory();
        using var journal = new DatagramListener(dir.File("journal"));
        (ulong, ulong)? stderr = (8, 1234);
        Assert.True(LoggingSetup.UseJournald(n => n == "JOURNAL_STREAM" ? "8:1234" : null, () => stderr, journal.Path));
        Assert.False(LoggingSetup.UseJournald(_ => null, () => stderr, journal.Path));
        Assert.False(LoggingSetup.UseJournald(n => n == "JOURNAL_STREAM" ? "8:1234" : null, () => stderr, dir.File("absent")));
    }

    /// <summary>systemd.exec(5): a process whose stderr was redirected since it inherited the variable is not on the journal.</summary>
    [Theory]
    [InlineData("8:1235")] // another stream: stderr was redirected
    [InlineData("9:1234")]
    [InlineData("8:1234:0")]
    [InlineData("8")]
    [InlineData(":1234")]
    [InlineData("8:")]
    [InlineData("-8:1234")]
    [InlineData(" 8:1234")]
    [InlineData("x")]
    public void UseJournald_JournalStreamNotStderrOrMalformed_Console(string variable)
    {
        using var dir = new TempDirectory();
        using var journal = new DatagramListener(dir.File("journal"));
        Assert.False(LoggingSetup.UseJournald(n => n == "JOURNAL_STREAM" ? variable : null, () => (8, 1234), journal.Path));
    }

    [Fact]
    public void UseJournald_StderrClosed_Console()
    {
        using var dir = new TempDirectory();
        using var journal = new DatagramListener(dir.File("journal"));
        Assert.False(LoggingSetup.UseJournald(n => n == "JOURNAL_STREAM" ? "8:1234" : null, () => null, journal.Path));
    }

    [Fact]
    public void UseJournald_StderrCannotBeChecked_TheVariableDecides()
    {
        using var dir = new TempDirectory();
        using var journal = new DatagramListener(dir.File("journal"));
        Assert.True(LoggingSetup.UseJournald(n => n == "JOURNAL_STREAM" ? "8:1234" : null, () => throw new PlatformNotSupportedException(), journal.Path));
    }

    [Fact]
    public void ParseJournalStream_LargestNumbers_Parsed() =>
        Assert.Equal((ulong.MaxValue, 1UL), LoggingSetup.ParseJournalStream("18446744073709551615:1"));
}

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
        // Cut visibly: a reader sees that, and how much, is missing.
        int cut = Encoding.UTF8.GetByteCount(message) - (JournaldFormat.MaxValueBytes - 1);
        Assert.Equal(new string('a', JournaldFormat.MaxValueBytes - 1) + $" [{cut} more bytes cut]", new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(value));
    }

    [Fact]
    public void Emit_RecordLargerThanADatagram_GoesWholeInASealedMemfd()
    {
        // A long exception chain (its outer stack trace last) was cut at 48 KiB without a mark; a datagram over the send
        // buffer fails with EMSGSIZE, which was then counted as "journald was not reading". sd_journal_sendv passes such
        // a record in a sealed memfd, and so does the sink now.
        using var dir = new TempDirectory();
        using System.Net.Sockets.Socket journal = TestSupport.Descriptors.BindDatagram(dir.File("journal"));
        using var sink = new JournaldSink(dir.File("journal"));
        using Serilog.Core.Logger serilog = new LoggerConfiguration().WriteTo.Sink(sink).CreateLogger();
        string trace = string.Join('\n', Enumerable.Range(0, 9000).Select(i => $"   at Frame{i:D5}.Method() in /src/File.cs:line {i}"));

        serilog.Error(new WithTrace(new InvalidOperationException("outer", new IOException("inner")), trace), "failed {Mapping}", "fs");

        (string text, int[] fds) = TestSupport.Descriptors.Receive(journal);
        Assert.Equal("", text);
        int memfd = Assert.Single(fds);
        using var handle = new Microsoft.Win32.SafeHandles.SafeFileHandle(memfd, ownsHandle: true);
        Assert.Equal(15, TestSupport.Descriptors.Seals(memfd)); // SEAL, SHRINK, GROW, WRITE: journald refuses an unsealed one from non-root
        byte[] record = new byte[RandomAccess.GetLength(handle)];
        Assert.Equal(record.Length, RandomAccess.Read(handle, record, 0));
        Assert.InRange(record.Length, 300_000, JournaldFormat.MaxValueBytes);
        (Dictionary<string, string> f, HashSet<string> binary) = Parse(record);
        Assert.Equal("failed fs", f["MESSAGE"]);
        Assert.Equal("fs", f["MAPPING"]);
        Assert.EndsWith("   at Frame08999.Method() in /src/File.cs:line 8999", f["EXCEPTION"], StringComparison.Ordinal);
        Assert.Contains("EXCEPTION", binary);
        Assert.Equal(0, sink.Dropped);
    }

    /// <summary>An exception whose ToString is a given (long) stack trace.</summary>
    private sealed class WithTrace(Exception inner, string trace) : Exception(inner.Message, inner)
    {
        public override string ToString() => "WithTrace: " + Message + "\n" + trace;
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

using System.Buffers;
using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using Serilog.Events;
using Serilog.Parsing;

namespace NbdDaemon.Logging;

/// <summary>
/// Encodes a log event in the journald native protocol (systemd.journal-fields(7), "Native Journal Protocol"):
/// one datagram of fields, each either <c>NAME=value\n</c> or, when the value contains a newline,
/// <c>NAME\n</c> + little-endian 64-bit length + value bytes + <c>\n</c>.
/// </summary>
internal static class JournaldFormat
{
    /// <summary>
    /// Per-value cap, far above any record the daemon writes (a long exception chain is tens of KiB): only a runaway value
    /// is cut, and then visibly (<see cref="CutMark"/>). A record larger than a datagram goes to journald in a memfd
    /// (<see cref="JournaldSink"/>), as sd_journal_sendv does, so the cap is not what keeps records whole.
    /// </summary>
    public const int MaxValueBytes = 1024 * 1024;

    /// <summary>Appended to a value cut at <see cref="MaxValueBytes"/>: "… [N more bytes cut]".</summary>
    public const string CutMark = " [{0} more bytes cut]";

    /// <summary>Field names the sink writes itself; same-named properties are not repeated.</summary>
    private static readonly HashSet<string> s_reserved = new(StringComparer.Ordinal)
    {
        "MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EXCEPTION", "MESSAGE_TEMPLATE",
    };

    public static byte[] Format(LogEvent logEvent, string identifier)
    {
        var buffer = new ArrayBufferWriter<byte>(512);
        AppendField(buffer, "MESSAGE", RenderLiteral(logEvent));
        AppendField(buffer, "PRIORITY", Priority(logEvent.Level).ToString(CultureInfo.InvariantCulture));
        AppendField(buffer, "SYSLOG_IDENTIFIER", identifier);
        AppendField(buffer, "MESSAGE_TEMPLATE", logEvent.MessageTemplate.Text);
        if (logEvent.Exception is not null)
        {
            AppendField(buffer, "EXCEPTION", logEvent.Exception.ToString());
        }

        foreach (KeyValuePair<string, LogEventPropertyValue> property in logEvent.Properties)
        {
            string? name = FieldName(property.Key);
            if (name is null || s_reserved.Contains(name))
            {
                continue;
            }

            string value = property.Value is ScalarValue { Value: var scalar }
                ? Convert.ToString(scalar, CultureInfo.InvariantCulture) ?? string.Empty
                : property.Value.ToString(null, CultureInfo.InvariantCulture);
            AppendField(buffer, name, value);
        }

        return buffer.WrittenSpan.ToArray();
    }

    /// <summary>Renders the message with string properties unquoted (Serilog's ":l"), as journalctl readers expect.</summary>
    public static string RenderLiteral(LogEvent logEvent)
    {
        using var output = new StringWriter(CultureInfo.InvariantCulture);
        foreach (MessageTemplateToken token in logEvent.MessageTemplate.Tokens)
        {
            if (token is PropertyToken property
                && logEvent.Properties.TryGetValue(property.PropertyName, out LogEventPropertyValue? value)
                && value is ScalarValue { Value: string text })
            {
                output.Write(text);
            }
            else
            {
                token.Render(logEvent.Properties, output, CultureInfo.InvariantCulture);
            }
        }

        return output.ToString();
    }

    /// <summary>syslog(3) priorities: Fatal=crit(2), Error=err(3), Warning=warning(4), Information=info(6), Debug/Verbose=debug(7).</summary>
    public static int Priority(LogEventLevel level) => level switch
    {
        LogEventLevel.Fatal => 2,
        LogEventLevel.Error => 3,
        LogEventLevel.Warning => 4,
        LogEventLevel.Information => 6,
        _ => 7,
    };

    /// <summary>Journal field names: A-Z, 0-9 and '_', not starting with '_' or a digit, at most 64 characters.</summary>
    public static string? FieldName(string property)
    {
        var name = new StringBuilder(property.Length);
        foreach (char c in property)
        {
            char u = char.ToUpperInvariant(c);
            name.Append(u is (>= 'A' and <= 'Z') or (>= '0' and <= '9') ? u : '_');
        }

        string result = name.ToString().TrimStart('_');
        if (result.Length == 0 || char.IsAsciiDigit(result[0]))
        {
            return null;
        }

        return result.Length > 64 ? result[..64] : result;
    }

    private static void AppendField(ArrayBufferWriter<byte> buffer, string name, string value)
    {
        byte[] bytes = Encoding.UTF8.GetBytes(value);
        int length = Math.Min(bytes.Length, MaxValueBytes);
        // Cut where a character starts: half a UTF-8 sequence would make journalctl show the field as a binary blob.
        while (length < bytes.Length && length > 0 && (bytes[length] & 0xC0) == 0x80)
        {
            length--;
        }

        byte[] mark = length == bytes.Length ? [] : Encoding.ASCII.GetBytes(string.Format(CultureInfo.InvariantCulture, CutMark, bytes.Length - length));
        Write(buffer, Encoding.ASCII.GetBytes(name));
        if (value.Contains('\n', StringComparison.Ordinal))
        {
            Write(buffer, "\n"u8);
            Span<byte> size = buffer.GetSpan(8)[..8];
            BinaryPrimitives.WriteUInt64LittleEndian(size, (ulong)(length + mark.Length));
            buffer.Advance(8);
        }
        else
        {
            Write(buffer, "="u8);
        }

        Write(buffer, bytes.AsSpan(0, length));
        Write(buffer, mark);
        Write(buffer, "\n"u8);
    }

    private static void Write(ArrayBufferWriter<byte> buffer, ReadOnlySpan<byte> bytes)
    {
        bytes.CopyTo(buffer.GetSpan(bytes.Length));
        buffer.Advance(bytes.Length);
    }
}

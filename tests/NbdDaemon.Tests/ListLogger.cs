using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;

namespace NbdDaemon.Tests;

/// <summary>Keeps every formatted log line with its level; also a factory whose every category logs here.</summary>
internal sealed class ListLogger : ILogger, ILoggerFactory
{
    private readonly ConcurrentQueue<(LogLevel Level, string Message)> _entries = new();
    private readonly ConcurrentQueue<(LogLevel Level, string Message, Exception? Exception)> _records = new();

    public IReadOnlyList<(LogLevel Level, string Message)> Entries => [.. _entries];

    /// <summary>The entries with the exception each carried (a sink would print its stack trace).</summary>
    public IReadOnlyList<(LogLevel Level, string Message, Exception? Exception)> Records => [.. _records];

    public IDisposable? BeginScope<TState>(TState state)
        where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => true;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        string message = formatter(state, exception);
        _records.Enqueue((logLevel, message, exception));
        _entries.Enqueue((logLevel, message));
    }

    public ILogger CreateLogger(string categoryName) => this;

    public void AddProvider(ILoggerProvider provider)
    {
    }

    public void Dispose()
    {
    }
}

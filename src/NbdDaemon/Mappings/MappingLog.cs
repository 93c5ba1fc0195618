
namespace NbdDaemon.Mappings;

/// <summary>
/// Log events of the mapping loops. Property names are part of the journald contract: the sink upper-cases
/// them into the fields MAPPING, DEVICE, SERVER, EXPORT, STATE.
/// </summary>
internal static partial class MappingLog
{
    [LoggerMessage(EventId = 100, Message = "Mapping {Mapping} on {Device} ({Server}, export '{Export}'): {PreviousState} -> {State}{Detail}")]
    public static partial void Transition(
        ILogger logger, LogLevel level, Exception? exception, string mapping, string device, string server, string export,
        MappingState previousState, MappingState state, string detail);

    [LoggerMessage(EventId = 101, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: {Operation} failed while releasing the device")]
    public static partial void ReleaseStepFailed(ILogger logger, Exception exception, string mapping, string device, string operation);

    [LoggerMessage(EventId = 102, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: RECONFIGURE failed, connecting the device anew")]
    public static partial void ReconfigureFailed(ILogger logger, Exception exception, string mapping, string device);

    [LoggerMessage(EventId = 103, Level = LogLevel.Error, Message = "Mapping {Mapping} on {Device}: unexpected error, mapping stopped")]
    public static partial void LoopCrashed(ILogger logger, Exception exception, string mapping, string device);
}

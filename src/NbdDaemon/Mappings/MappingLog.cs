
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

    [LoggerMessage(EventId = 130, Level = LogLevel.Debug, Message = "Mapping {Mapping} on {Device}: the failure above, with its stack trace")]
    public static partial void FailureTrace(ILogger logger, Exception exception, string mapping, string device);

    [LoggerMessage(EventId = 101, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: {Operation} failed while releasing the device")]
    public static partial void ReleaseStepFailed(ILogger logger, Exception exception, string mapping, string device, string operation);

    [LoggerMessage(EventId = 102, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: RECONFIGURE failed, connecting the device anew")]
    public static partial void ReconfigureFailed(ILogger logger, Exception exception, string mapping, string device);

    [LoggerMessage(EventId = 103, Level = LogLevel.Error, Message = "Mapping {Mapping} on {Device}: unexpected error, mapping stopped")]
    public static partial void LoopCrashed(ILogger logger, Exception exception, string mapping, string device);

    [LoggerMessage(EventId = 104, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: {Operation}: kernel took {Taken} of {Total} sockets (SO_SNDTIMEO read back {SendTimeout} s)")]
    public static partial void SocketsTaken(ILogger logger, string mapping, string device, string operation, int taken, int total, double sendTimeout);

    [LoggerMessage(EventId = 105, Level = LogLevel.Information, Message = "Mapping {Mapping} adopted {Device} (backend {Backend}, {SizeBytes} bytes) left configured by an earlier daemon: kernel took {Taken} of {Total} fresh sockets")]
    public static partial void Adopted(ILogger logger, string mapping, string device, string backend, ulong sizeBytes, int taken, int total);

    [LoggerMessage(EventId = 106, Level = LogLevel.Information, Message = "Mapping {Mapping} adopted {Device} (backend {Backend}, {SizeBytes} bytes) left configured by an earlier daemon: its previous connection is still alive (kernel took 0 of {Total} fresh sockets); fresh sockets closed, serving until LINK_DEAD")]
    public static partial void AdoptedStillConnected(ILogger logger, string mapping, string device, string backend, ulong sizeBytes, int total);

    [LoggerMessage(EventId = 117, Level = LogLevel.Information, Message = "Mapping {Mapping} adopted {Device} (backend {Backend}, {SizeBytes} bytes) left configured by the previous process, carrying on with {Resumed} relay connections it handed over (the kernel's connections never ended); kernel took {Taken} of {Fresh} fresh sockets")]
    public static partial void AdoptedResumed(ILogger logger, string mapping, string device, string backend, ulong sizeBytes, int resumed, int taken, int fresh);

    [LoggerMessage(EventId = 107, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: OnStop=Leave, device left configured; the kernel keeps serving on its own sockets until the next start adopts it")]
    public static partial void LeftConfigured(ILogger logger, string mapping, string device);

    [LoggerMessage(EventId = 133, Level = LogLevel.Warning, Message = "Mapping {Mapping}: {Device} is another client's now (backend {Backend}, not ours): not disconnected")]
    public static partial void NotOursAnyMore(ILogger logger, string mapping, string device, string backend);

    [LoggerMessage(EventId = 134, Level = LogLevel.Warning, Message = "Mapping {Mapping}: {Device} is another client's now (backend {Backend}, not ours): the kernel gave it up during the outage; not reconnecting it, connecting a device afresh")]
    public static partial void TakenByAnother(ILogger logger, string mapping, string device, string backend);

    [LoggerMessage(EventId = 135, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: a connection slot not held by this process died, and filling it failed ({Reason}); serving on the connections left")]
    public static partial void TopUpFailed(ILogger logger, string mapping, string device, string reason);

    [LoggerMessage(EventId = 108, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: LINK_DEAD for an earlier connection ignored: every current socket is healthy")]
    public static partial void StaleLinkDeadIgnored(ILogger logger, string mapping, string device);

    [LoggerMessage(EventId = 118, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: the netlink event subscription failed; subscribed again and serving on (the connection's sockets are watched meanwhile)")]
    public static partial void EventsResubscribed(ILogger logger, Exception? exception, string mapping, string device);

    [LoggerMessage(EventId = 123, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: requests capped at {Kib} KiB (queue/max_sectors_kb was {Before}): the server takes at most {MaxBytes} bytes per request")]
    public static partial void RequestSizeLimited(ILogger logger, string mapping, string device, uint kib, uint before, uint maxBytes);

    [LoggerMessage(EventId = 127, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: device given up, queue/max_sectors_kb back to {Kib}")]
    public static partial void RequestSizeRestored(ILogger logger, string mapping, string device, uint kib);

    [LoggerMessage(EventId = 124, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: the server takes at most {MaxBytes} bytes per request, and the device's requests could not be capped ({Reason}); a larger request may fail with an I/O error if the server enforces its maximum")]
    public static partial void RequestSizeNotLimited(ILogger logger, string mapping, string device, uint maxBytes, string reason);

    [LoggerMessage(EventId = 119, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: the netlink event subscription failed and subscribing again failed too; serving on, the connection's sockets watched, trying again in a second")]
    public static partial void EventsNotResubscribed(ILogger logger, Exception? exception, string mapping, string device);

    [LoggerMessage(EventId = 109, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: watching the connection's sockets failed; relying on LINK_DEAD alone")]
    public static partial void SocketWatchFailed(ILogger logger, Exception? exception, string mapping, string device);
}

/// <summary>Log events of mappings with <c>Relay: true</c> (the relay between the kernel's socket pair and the server).</summary>
internal static partial class RelayLog
{
    [LoggerMessage(EventId = 110, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: relay lost the server connection ({Reason}); reconnecting, {InFlight} requests held")]
    public static partial void ServerLost(ILogger logger, string mapping, string device, string reason, int inFlight);

    [LoggerMessage(EventId = 111, Message = "Mapping {Mapping} on {Device}: relay reconnect attempt {Attempt} failed: {Reason}")]
    public static partial void ReconnectFailed(ILogger logger, LogLevel level, string mapping, string device, int attempt, string reason);

    [LoggerMessage(EventId = 112, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: relay reconnected after {OutageMs:0} ms ({Attempts} attempts), {Resent} requests resent")]
    public static partial void Reconnected(ILogger logger, string mapping, string device, double outageMs, int attempts, int resent);

    [LoggerMessage(EventId = 113, Message = "Mapping {Mapping} on {Device}: relay ended ({Reason}: {Detail})")]
    public static partial void Ended(ILogger logger, LogLevel level, Exception? exception, string mapping, string device, Nbd.Protocol.Transmission.NbdRelayEndReason reason, string detail);

    [LoggerMessage(EventId = 114, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: relay stopped between two requests with every reply delivered; its end of the kernel's connection went to systemd's file descriptor store as {Name}, for the next start to resume")]
    public static partial void HandedOver(ILogger logger, string mapping, string device, string name);

    [LoggerMessage(EventId = 115, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: relay not handed over ({Reason}); the kernel's connection ends with this process, and the next start adopts the device with a new one")]
    public static partial void NotHandedOver(ILogger logger, Exception? exception, string mapping, string device, string reason);

    [LoggerMessage(EventId = 126, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: relay end handed over by the previous process not used by this attempt: given back untouched, as {Name}, for the next attempt or start")]
    public static partial void GivenBack(ILogger logger, string mapping, string device, string name);

    [LoggerMessage(EventId = 116, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: relay resumed on the kernel's connection handed over by the previous process; the kernel's requests carry on from where it stopped")]
    public static partial void Resumed(ILogger logger, string mapping, string device);

    [LoggerMessage(EventId = 136, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: relay resumed on the kernel's connection from its journal {Journal}, which the previous process left in systemd's file descriptor store: {Resent} requests it had not answered resent, {Finished} bytes of a reply it had cut off finished, {Answered} requests answered already")]
    public static partial void ResumedJournaled(ILogger logger, string mapping, string device, string journal, int resent, long finished, int answered);

    [LoggerMessage(EventId = 137, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: relay journal and both ends of the kernel's connection are in systemd's file descriptor store as {Journal}: should this process be killed, the next one carries the connection on")]
    public static partial void JournalKept(ILogger logger, string mapping, string device, string journal);

    [LoggerMessage(EventId = 138, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: relay keeps no journal ({Reason}); should this process be killed, the requests in flight wait for the driver's timeout")]
    public static partial void JournalNotKept(ILogger logger, string mapping, string device, string reason);

    [LoggerMessage(EventId = 139, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: relay journal {Journal} left by the previous process refused ({Reason}); the kernel's connection is ended and the driver resends its requests after its timeout")]
    public static partial void JournalRefused(ILogger logger, string mapping, string device, string journal, string reason);

    [LoggerMessage(EventId = 141, Level = LogLevel.Information, Message = "Mapping {Mapping} on {Device}: relay stopped between two requests with every reply delivered; its journal {Journal} stays in systemd's file descriptor store with both ends of the kernel's connection, for the next start to resume")]
    public static partial void HandedOverJournaled(ILogger logger, string mapping, string device, string journal);

    [LoggerMessage(EventId = 143, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: relay did not reach a point between two requests with every reply delivered within {Seconds:0.###} s ({InFlight} requests unanswered); it stopped where it stood, and its journal {Journal} stays in systemd's file descriptor store with both ends of the kernel's connection: the next start carries on from there")]
    public static partial void DetachedJournaled(ILogger logger, string mapping, string device, int inFlight, double seconds, string journal);

    [LoggerMessage(EventId = 144, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: the kernel end's SO_SNDTIMEO could not be set back to the mapping's Timeout ({Reason}); it stays at what the previous process left")]
    public static partial void SendTimeoutNotReset(ILogger logger, string mapping, string device, string reason);

    [LoggerMessage(EventId = 140, Level = LogLevel.Warning, Message = "Mapping {Mapping} on {Device}: relay journal abandoned ({Reason}); the relay carries on, but should this process be killed, the requests in flight wait for the driver's timeout")]
    public static partial void JournalAbandoned(ILogger logger, string mapping, string device, string reason);
}

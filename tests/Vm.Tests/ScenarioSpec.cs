namespace Vm.Tests;

/// <summary>A scenario script under tests/vm/scenarios and what its VM needs.</summary>
public sealed record ScenarioSpec(string Script, IReadOnlyList<string> Programs, bool NeedsDaemon, int TimeoutSeconds)
{
    /// <summary>The C tools of tests/vm/tools (nbd-verify, fault-proxy) on the VM's PATH.</summary>
    public bool NeedsTools { get; init; }

    /// <summary>tests/Nbd.RelayChild, published, at /opt/Nbd.RelayChild.</summary>
    public bool NeedsRelayChild { get; init; }

    /// <summary>Modules of the VM's kernel (with their dependencies) the scenario loads itself (run-vm.sh --module).</summary>
    public IReadOnlyList<string> Modules { get; init; } = [];

    public static readonly ScenarioSpec Anchor = new("anchor-nbd-client.sh", ["nbd-server", "nbd-client"], false, 180);

    public static readonly ScenarioSpec DaemonMap = new("daemon-map.sh", ["nbd-server", "nbdkit", "qemu-nbd"], true, 900);

    public static readonly ScenarioSpec DaemonDevice = new("daemon-device.sh", ["nbd-server"], true, 900) { NeedsTools = true };
}

using NbdDaemon.Configuration;
using NbdDaemon.Mappings;

namespace NbdDaemon.Hosting;

/// <summary>
/// Stand-ins registered until the adapters over Nbd.Protocol and Nbd.Kernel are written (integration step).
/// They fail every mapping permanently with a plain reason instead of pretending to work.
/// </summary>
internal sealed class NotIntegratedConnector : INbdConnector
{
    public Task<INbdSession> ConnectAsync(MappingOptions mapping, CancellationToken cancellationToken) =>
        Task.FromException<INbdSession>(new MappingException("NBD protocol adapter not linked into this build", FailureKind.Permanent));
}

/// <inheritdoc cref="NotIntegratedConnector"/>
internal sealed class NotIntegratedKernel : INbdKernel
{
    public IIoctlDevice OpenDevice(string? path) =>
        throw new MappingException("kernel adapter not linked into this build", FailureKind.Permanent);

    public INbdNetlinkControl OpenNetlink() =>
        throw new MappingException("kernel adapter not linked into this build", FailureKind.Permanent);
}

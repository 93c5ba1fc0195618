using System.Net.Sockets;
using Nbd.Kernel;
using Nbd.Protocol;

namespace NbdDaemon.Mappings.Linux;

/// <summary><see cref="INbdKernel"/> over the real driver (<c>Nbd.Kernel</c>).</summary>
/// <param name="sysBlock">Root of the block devices in sysfs; a parameter so tests can point it at a fake tree.</param>
internal sealed class LinuxKernel(string sysBlock = "/sys/block") : INbdKernel
{
    public IIoctlDevice OpenDevice(string? path, Func<int, bool>? mayUse = null) => IoctlDevice.Open(path, mayUse);

    public INbdNetlinkControl OpenNetlink() => NetlinkControl.Open();

    public IReadOnlyList<int> ListDevices() => NbdSysfs.ListDevices(sysBlock);

    public KernelDeviceInfo? ReadDevice(int index)
    {
        NbdDeviceStatus status;
        try
        {
            status = NbdSysfs.Read(index, sysBlock);
        }
        catch (NbdKernelException e) when (e.ErrnoName == "ENOENT")
        {
            return null;
        }

        return new KernelDeviceInfo(status.Index, status.SizeBytes, status.LogicalBlockSize, status.Backend, status.IsConnected, status.ReadOnly)
        {
            Sends = (status.WriteBack ? TransmissionFlags.SendFlush : 0)
                // The block layer strips FUA from writes while the cache is write through, whatever queue/fua says.
                | (status.WriteBack && status.Fua ? TransmissionFlags.SendFua : 0)
                | (status.DiscardMaxBytes > 0 ? TransmissionFlags.SendTrim : 0)
                | (status.WriteZeroesMaxBytes > 0 ? TransmissionFlags.SendWriteZeroes : 0),
        };
    }

    public void ClearSendTimeout(Socket socket) => NbdSocketTimeout.Clear(socket);

    public TimeSpan ReadSendTimeout(Socket socket) => NbdSocketTimeout.Read(socket);

    public (uint Before, uint After) LimitRequestSize(int index, uint maxBytes) => NbdSysfs.LimitRequestSize(index, maxBytes, sysBlock);

    public bool RestoreRequestSize(int index, uint expectedKb, uint restoreKb) => NbdSysfs.RestoreRequestSize(index, expectedKb, restoreKb, sysBlock);

    public IDisposable LockMapping(string backendIdentifier) => MappingLock.Take(backendIdentifier);

    public ISocketWatch WatchSockets(IReadOnlyList<Socket> sockets) => new SocketWatch(NbdSocketWatch.Start(sockets), sockets.Count);

    private sealed class SocketWatch(NbdSocketWatch watch, int count) : ISocketWatch
    {
        public Task<string> Ended { get; } = Describe(watch.Ended, count);

        public void Dispose() => watch.Dispose();

        private static async Task<string> Describe(Task<NbdSocketEnd> ended, int count)
        {
            NbdSocketEnd end = await ended.ConfigureAwait(false);
            return string.Create(System.Globalization.CultureInfo.InvariantCulture, $"socket {end.Index + 1} of {count}: {end.Describe()}");
        }
    }
}

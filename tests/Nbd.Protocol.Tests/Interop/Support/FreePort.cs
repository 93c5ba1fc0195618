using System.Net;
using System.Net.Sockets;

namespace Nbd.Protocol.Tests.Interop.Support;

internal static class FreePort
{
    /// <summary>
    /// A loopback port the kernel just handed out. nbd-server treats port 0 as "serve stdin" (inetd mode) and the
    /// others cannot report a kernel-chosen port, so we pick one and pass it; the tiny reuse race is covered by
    /// <see cref="ServerProcess"/> retrying on a fresh port.
    /// </summary>
    public static int Pick()
    {
        using var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        probe.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        return ((IPEndPoint)probe.LocalEndPoint!).Port;
    }
}

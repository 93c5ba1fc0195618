namespace Nbd.Kernel.Netlink;

/// <summary>A netlink datagram from the kernel did not parse (truncated, bad lengths, missing attribute).</summary>
internal sealed class NetlinkProtocolException(string message) : Exception(message);

using System.Net;
using System.Net.Sockets;
using NbdDaemon.Mappings.Linux;

namespace NbdDaemon.Tests.Mappings.Linux;

/// <summary>Keepalive settings as the host kernel has them after <see cref="TcpKeepAlive.Apply"/> (read back with getsockopt).</summary>
public sealed class TcpKeepAliveTests
{
    [Theory]
    [InlineData(30, 15, 5)]
    [InlineData(6, 3, 1)]
    [InlineData(3, 1, 1)]
    [InlineData(600, 300, 100)]
    public void Settings_SplitTheBudgetIntoIdleAndThreeProbes(int budgetSeconds, int idle, int interval)
    {
        Assert.Equal((idle, interval, 3), TcpKeepAlive.Settings(TimeSpan.FromSeconds(budgetSeconds)));
    }

    [Fact]
    public void Apply_TcpSocket_KernelHasKeepaliveWithTheSettings()
    {
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);

        TcpKeepAlive.Apply(socket, TimeSpan.FromSeconds(30));

        Assert.Equal(1, (int)socket.GetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive)!);
        Assert.Equal(15, (int)socket.GetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime)!);
        Assert.Equal(5, (int)socket.GetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval)!);
        Assert.Equal(3, (int)socket.GetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount)!);
    }

    [Fact]
    public void Apply_TheLargestKeepAliveTheConfigurationTakes_KernelTakesIt_OneSecondMoreItRefuses()
    {
        // The configuration's bound is the kernel's (TCP_KEEPIDLE ≤ 32767 s): above it every connect failed with EINVAL.
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        TcpKeepAlive.Apply(socket, NbdDaemon.Configuration.MappingOptions.MaximumKeepAlive);
        Assert.Equal(32767, (int)socket.GetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime)!);

        using var over = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        var refused = Assert.Throws<SocketException>(() => TcpKeepAlive.Apply(over, NbdDaemon.Configuration.MappingOptions.MaximumKeepAlive + TimeSpan.FromSeconds(1)));
        Assert.Equal(SocketError.InvalidArgument, refused.SocketErrorCode);
    }

    [Fact]
    public void Apply_Zero_LeavesKeepaliveOff()
    {
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);

        TcpKeepAlive.Apply(socket, TimeSpan.Zero);

        Assert.Equal(0, (int)socket.GetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive)!);
    }

    [Fact]
    public void Apply_UnixSocket_Untouched()
    {
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);

        TcpKeepAlive.Apply(socket, TimeSpan.FromSeconds(30));

        Assert.Equal(0, (int)socket.GetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive)!);
    }

    [Fact]
    public void Apply_ConnectedIpv6Socket_KernelHasKeepalive()
    {
        using var listener = new Socket(AddressFamily.InterNetworkV6, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.IPv6Loopback, 0));
        listener.Listen();
        using var socket = new Socket(AddressFamily.InterNetworkV6, SocketType.Stream, ProtocolType.Tcp);
        socket.Connect(listener.LocalEndPoint!);

        TcpKeepAlive.Apply(socket, TimeSpan.FromSeconds(6));

        Assert.Equal(1, (int)socket.GetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive)!);
        Assert.Equal(3, (int)socket.GetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime)!);
    }
}

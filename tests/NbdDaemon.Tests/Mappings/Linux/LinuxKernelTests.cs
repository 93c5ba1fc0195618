using System.Net;
using System.Net.Sockets;
using NbdDaemon.Mappings;
using NbdDaemon.Mappings.Linux;

namespace NbdDaemon.Tests.Mappings.Linux;

public sealed class LinuxKernelTests
{
    [Fact]
    public void ReadDevice_ConfiguredReadOnlyDevice_AllFields()
    {
        using var sys = new TempDirectory();
        WriteDevice(sys.Path, 2, ("size", "2097152"), ("pid", "812"), ("backend", "nbd-daemon:data"), ("ro", "1"), ("queue/logical_block_size", "4096"));
        WriteDevice(sys.Path, 0, ("size", "0"), ("ro", "0"));
        var kernel = new LinuxKernel(sys.Path);

        Assert.Equal([0, 2], kernel.ListDevices());
        Assert.Equal(new KernelDeviceInfo(2, 1UL << 30, 4096, "nbd-daemon:data", Connected: true, ReadOnly: true), kernel.ReadDevice(2));
        Assert.Equal(new KernelDeviceInfo(0, 0, 0, null, Connected: false, ReadOnly: false), kernel.ReadDevice(0));
        Assert.Null(kernel.ReadDevice(7));
    }

    /// <summary>Values as the 6.1 driver leaves them: FLUSH + FUA + TRIM give write back, fua 1, discard_max_bytes UINT_MAX sectors.</summary>
    [Theory]
    [InlineData("write back", "1", "2199023255040", "0", Nbd.Protocol.TransmissionFlags.SendFlush | Nbd.Protocol.TransmissionFlags.SendFua | Nbd.Protocol.TransmissionFlags.SendTrim)]
    [InlineData("write through", "0", "0", "0", Nbd.Protocol.TransmissionFlags.None)]
    [InlineData("write through", "1", "0", "0", Nbd.Protocol.TransmissionFlags.None)] // an admin's write through: no FUA goes out either
    [InlineData("write back", "0", "0", "33554432", Nbd.Protocol.TransmissionFlags.SendFlush | Nbd.Protocol.TransmissionFlags.SendWriteZeroes)]
    public void ReadDevice_QueueAttributes_WhatTheDeviceSends(string writeCache, string fua, string discard, string zeroes, Nbd.Protocol.TransmissionFlags sends)
    {
        using var sys = new TempDirectory();
        WriteDevice(
            sys.Path, 1, ("size", "2048"), ("pid", "9"), ("queue/write_cache", writeCache), ("queue/fua", fua), ("queue/discard_max_bytes", discard),
            ("queue/write_zeroes_max_bytes", zeroes));

        Assert.Equal(sends, new LinuxKernel(sys.Path).ReadDevice(1)!.Sends);
    }

    [Fact]
    public void SendTimeout_ClearedThenSetByAnotherWriter_ReadsKernelValueNotTheCachedOne()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        using var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { SendTimeout = 5000 };
        client.Connect(listener.LocalEndPoint!);
        var kernel = new LinuxKernel();

        Assert.Equal(TimeSpan.FromSeconds(5), kernel.ReadSendTimeout(client));
        kernel.ClearSendTimeout(client);
        Assert.Equal(TimeSpan.Zero, kernel.ReadSendTimeout(client));
        // .NET's own getter keeps answering what it last set: why the kernel's value is read with getsockopt.
        Assert.Equal(5000, client.SendTimeout);
    }

    private static void WriteDevice(string root, int index, params (string File, string Content)[] files)
    {
        string dir = Path.Combine(root, "nbd" + index);
        Directory.CreateDirectory(Path.Combine(dir, "queue"));
        foreach ((string file, string content) in files)
        {
            File.WriteAllText(Path.Combine(dir, file), content + "\n");
        }
    }
}

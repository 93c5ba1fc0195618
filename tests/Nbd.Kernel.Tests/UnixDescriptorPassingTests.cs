using System.Net.Sockets;
using System.Text;
using static TestSupport.Descriptors;

namespace Nbd.Kernel.Tests;

/// <summary>
/// <see cref="UnixDescriptorPassing"/> against the host kernel: the datagram a receiver gets (text and SCM_RIGHTS
/// descriptor, read with recvmsg(2) as systemd reads its notification socket), and what an inherited descriptor
/// must be to be taken as a socket.
/// </summary>
public sealed class UnixDescriptorPassingTests : IDisposable
{
    private readonly string _directory = Directory.CreateTempSubdirectory("nbd-fdpass-").FullName;

    public void Dispose() => Directory.Delete(_directory, recursive: true);

    [Fact]
    public void Send_WithDescriptor_ReceiverGetsTheTextAndAWorkingDescriptorForTheSameSocket()
    {
        (Socket kernelEnd, Socket relayEnd) = NbdSocketPair.Create();
        using Socket kernel = kernelEnd;
        using Socket receiver = BindDatagram(Path.Combine(_directory, "notify"));

        UnixDescriptorPassing.Send(Path.Combine(_directory, "notify"), "FDSTORE=1\nFDNAME=nbd-relay/fs/0", relayEnd.SafeHandle);
        relayEnd.Dispose(); // the receiver's descriptor keeps the connection open

        (string text, int[] fds) = Receive(receiver);
        Assert.Equal("FDSTORE=1\nFDNAME=nbd-relay/fs/0", text);
        int fd = Assert.Single(fds);
        using Socket received = new(new SafeSocketHandle(fd, ownsHandle: true));
        received.Send("through the passed end"u8);
        byte[] buffer = new byte[64];
        Assert.Equal("through the passed end", Encoding.ASCII.GetString(buffer, 0, kernel.Receive(buffer)));
    }

    [Fact]
    public void Send_WithoutDescriptor_PlainDatagramToAnAbstractSocket()
    {
        string name = "@nbd-fdpass-test-" + Guid.NewGuid().ToString("N");
        using Socket receiver = BindDatagram(name);

        UnixDescriptorPassing.Send(name, "FDSTOREREMOVE=1\nFDNAME=nbd-relay/fs/0", descriptor: null);

        (string text, int[] fds) = Receive(receiver);
        Assert.Equal("FDSTOREREMOVE=1\nFDNAME=nbd-relay/fs/0", text);
        Assert.Empty(fds);
    }

    [Fact]
    public void Send_NobodyListens_ThrowsNamingThePathAndErrno()
    {
        string path = Path.Combine(_directory, "absent");
        var e = Assert.Throws<NbdKernelException>(() => UnixDescriptorPassing.Send(path, "FDSTORE=1", descriptor: null));
        Assert.Equal(path, e.Device);
        Assert.Equal("ENOENT", e.ErrnoName);
    }

    [Fact]
    public void AdoptInheritedStreamSocket_StreamSocket_TakenAndMarkedCloseOnExec()
    {
        (Socket kernelEnd, Socket relayEnd) = NbdSocketPair.Create();
        using Socket kernel = kernelEnd;
        int fd = Dup((int)relayEnd.Handle);
        relayEnd.Dispose();
        Assert.False(IsCloseOnExec(fd)); // dup(2) clears it, as an exec'd process inherits it

        using Socket adopted = UnixDescriptorPassing.AdoptInheritedStreamSocket(fd);

        Assert.True(IsCloseOnExec(fd));
        kernel.Send("x"u8);
        byte[] buffer = new byte[1];
        Assert.Equal(1, adopted.Receive(buffer));
    }

    [Fact]
    public void AdoptInheritedStreamSocket_DatagramSocket_RefusedNamingWhatItIs()
    {
        using var datagram = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        var e = Assert.Throws<NbdKernelException>(() => UnixDescriptorPassing.AdoptInheritedStreamSocket((int)datagram.Handle));
        Assert.Equal("ENOTSOCK", e.ErrnoName);
        Assert.Contains("type 2: not an AF_UNIX stream socket", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void AdoptInheritedStreamSocket_RegularFile_Refused()
    {
        using FileStream file = File.Create(Path.Combine(_directory, "file"));
        var e = Assert.Throws<NbdKernelException>(() => UnixDescriptorPassing.AdoptInheritedStreamSocket((int)file.SafeFileHandle.DangerousGetHandle()));
        Assert.Equal("ENOTSOCK", e.ErrnoName);
        Assert.StartsWith("inherited descriptor ", e.Device, StringComparison.Ordinal);
    }

    [Fact]
    public void AdoptInheritedStreamSocket_ClosedDescriptor_Refused()
    {
        int fd = Dup(0);
        UnixDescriptorPassing.Close(fd);
        var e = Assert.Throws<NbdKernelException>(() => UnixDescriptorPassing.AdoptInheritedStreamSocket(fd));
        Assert.Equal("EBADF", e.ErrnoName);
    }
}

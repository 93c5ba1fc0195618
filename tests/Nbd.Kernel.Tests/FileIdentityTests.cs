using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;

namespace Nbd.Kernel.Tests;

public sealed class FileIdentityTests
{
    [Fact]
    public void Of_OpenFile_DeviceAndInodeAsStatPrintsThem()
    {
        string path = Path.GetTempFileName();
        try
        {
            using var file = new FileStream(path, FileMode.Open);
            (ulong device, ulong inode) = Assert.NotNull(FileIdentity.Of((int)file.SafeFileHandle.DangerousGetHandle()));

            // coreutils' stat: %d device number in decimal (st_dev), %i inode number.
            var info = new ProcessStartInfo("stat", ["-c", "%d:%i", path]) { RedirectStandardOutput = true };
            using Process stat = Process.Start(info)!;
            string printed = stat.StandardOutput.ReadToEnd().Trim();
            stat.WaitForExit();
            Assert.Equal(printed, string.Create(CultureInfo.InvariantCulture, $"{device}:{inode}"));
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void Of_Socket_InodeTheKernelNamesInProcFd()
    {
        // What $JOURNAL_STREAM names is a socket: its inode is the one /proc/self/fd shows as "socket:[INODE]".
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        int fd = (int)socket.Handle;
        (_, ulong inode) = Assert.NotNull(FileIdentity.Of(fd));
        string link = new FileInfo($"/proc/self/fd/{fd}").LinkTarget!;
        Assert.Equal($"socket:[{inode.ToString(CultureInfo.InvariantCulture)}]", link);
    }

    [Fact]
    public void Of_NotADescriptor_Null() => Assert.Null(FileIdentity.Of(-1)); // EBADF
}

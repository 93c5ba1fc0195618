using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;

namespace TestSupport;

/// <summary>
/// Raw descriptor operations the tests need to play the other side of descriptor passing: dup(2) (what SCM_RIGHTS
/// gives a receiver), fcntl(F_GETFD), and a datagram socket read with recvmsg(2) as systemd reads its notification
/// socket (the text and every SCM_RIGHTS descriptor attached).
/// </summary>
internal static unsafe partial class Descriptors
{
    private const int SolSocket = 1;
    private const int ScmRights = 1;
    private const int FGetFd = 1;
    private const int FdCloexec = 1;

    /// <summary>A new descriptor (and Socket) for the same open socket, without close-on-exec, as dup(2) makes it.</summary>
    public static Socket Duplicate(Socket socket) => new(new SafeSocketHandle(Dup((int)socket.Handle), ownsHandle: true));

    /// <summary>dup(2) of a raw descriptor; fails the test if it fails.</summary>
    public static int Dup(int fd)
    {
        int copy = DupNative(fd);
        Assert.True(copy >= 0, $"dup({fd}) failed: errno {Marshal.GetLastPInvokeError()}");
        return copy;
    }

    /// <summary>close(2) of a raw descriptor.</summary>
    public static void Close(int fd) => _ = CloseNative(fd);

    public static bool IsCloseOnExec(int fd) => (Fcntl(fd, FGetFd, 0) & FdCloexec) != 0;

    /// <summary>fcntl(F_GET_SEALS): the seals of a memfd (F_SEAL_SEAL 1, SHRINK 2, GROW 4, WRITE 8).</summary>
    public static int Seals(int fd) => Fcntl(fd, 1034, 0);

    /// <summary>A datagram socket bound at <paramref name="path"/> ('@' for an abstract name), 5 s receive timeout.</summary>
    public static Socket BindDatagram(string path)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        socket.Bind(new UnixDomainSocketEndPoint(path.StartsWith('@') ? "\0" + path[1..] : path));
        socket.ReceiveTimeout = 5000;
        return socket;
    }

    /// <summary>One datagram: its text and the descriptors attached (the receiver owns them).</summary>
    public static (string Text, int[] Fds) Receive(Socket socket)
    {
        byte[] data = new byte[4096];
        byte* control = stackalloc byte[64];
        new Span<byte>(control, 64).Clear();
        fixed (byte* buffer = data)
        {
            var vector = new IoVec { Base = buffer, Length = (nuint)data.Length };
            var header = new MsgHdr { Iov = &vector, IovLen = 1, Control = control, ControlLen = 64 };
            nint n = RecvMsg((int)socket.Handle, &header, 0);
            Assert.True(n >= 0, $"recvmsg failed: errno {Marshal.GetLastPInvokeError()}");
            var fds = new List<int>();
            if (header.ControlLen >= 16 && *(int*)(control + 8) == SolSocket && *(int*)(control + 12) == ScmRights)
            {
                nuint length = *(nuint*)control;
                for (int offset = 16; offset + 4 <= (int)length; offset += 4)
                {
                    fds.Add(*(int*)(control + offset));
                }
            }

            return (Encoding.UTF8.GetString(data, 0, (int)n), [.. fds]);
        }
    }

    [LibraryImport("libc", EntryPoint = "recvmsg", SetLastError = true)]
    private static partial nint RecvMsg(int fd, MsgHdr* message, int flags);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    private static partial int CloseNative(int fd);

    [LibraryImport("libc", EntryPoint = "dup", SetLastError = true)]
    private static partial int DupNative(int fd);

    [LibraryImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    private static partial int Fcntl(int fd, int command, int argument);

    [StructLayout(LayoutKind.Sequential)]
    private struct IoVec
    {
        public byte* Base;
        public nuint Length;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct MsgHdr
    {
        public void* Name;
        public uint NameLen;
        public IoVec* Iov;
        public nuint IovLen;
        public void* Control;
        public nuint ControlLen;
        public int Flags;
    }
}

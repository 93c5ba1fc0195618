using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using Microsoft.Win32.SafeHandles;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel;

/// <summary>
/// Descriptors across processes, the way systemd's notification socket takes them: a datagram with SCM_RIGHTS
/// (sd_pid_notify_with_fds(3), "FDSTORE=1"), and sockets inherited through $LISTEN_FDS (sd_listen_fds(3)). .NET has
/// neither ancillary data nor a way to check what an inherited descriptor is.
/// </summary>
public static class UnixDescriptorPassing
{
    /// <summary>sizeof(struct sockaddr_un.sun_path).</summary>
    private const int MaxPathLength = 108;

    /// <summary>
    /// Sends <paramref name="message"/> as one datagram to the AF_UNIX socket at <paramref name="socketPath"/> (a leading
    /// '@' names an abstract socket, as in $NOTIFY_SOCKET), with <paramref name="descriptor"/> attached (SCM_RIGHTS) when
    /// given: the receiver gets its own descriptor for the same open file, whatever the sender does with its one after.
    /// </summary>
    /// <exception cref="NbdKernelException">socket(2) or sendmsg(2) failed (errno named), or the path is too long.</exception>
    public static void Send(string socketPath, string message, SafeHandle? descriptor) =>
        Send(socketPath, Encoding.UTF8.GetBytes(message ?? throw new ArgumentNullException(nameof(message))), descriptor, SocketConstants.MSG_NOSIGNAL);

    /// <summary>
    /// Sends <paramref name="contents"/> the way journald takes a record too large for one datagram (sd_journal_sendv's
    /// fallback, systemd.io/JOURNAL_NATIVE_PROTOCOL): in a memfd, sealed against any change (journald refuses an unsealed
    /// one from an unprivileged sender), passed with SCM_RIGHTS in an empty datagram. Never blocks: a receiver whose
    /// queue is full gives EAGAIN.
    /// </summary>
    /// <exception cref="NbdKernelException">memfd_create(2), write(2), fcntl(2) or sendmsg(2) failed (errno named).</exception>
    public static unsafe void SendSealedMemoryFile(string socketPath, ReadOnlySpan<byte> contents, string name)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        int memfd = Libc.MemfdCreate(name, SocketConstants.MFD_CLOEXEC | SocketConstants.MFD_ALLOW_SEALING);
        if (memfd < 0)
        {
            throw new NbdKernelException(socketPath, "memfd_create", Marshal.GetLastPInvokeError());
        }

        using var handle = new SafeFileHandle(memfd, ownsHandle: true);
        fixed (byte* start = contents)
        {
            for (int written = 0; written < contents.Length;)
            {
                nint n = Libc.Write(memfd, start + written, (nuint)(contents.Length - written));
                if (n < 0)
                {
                    throw new NbdKernelException(socketPath, "write (memfd)", Marshal.GetLastPInvokeError());
                }

                written += (int)n;
            }
        }

        const int seals = SocketConstants.F_SEAL_SEAL | SocketConstants.F_SEAL_SHRINK | SocketConstants.F_SEAL_GROW | SocketConstants.F_SEAL_WRITE;
        if (Libc.Fcntl(memfd, SocketConstants.F_ADD_SEALS, seals) < 0)
        {
            throw new NbdKernelException(socketPath, "fcntl(F_ADD_SEALS)", Marshal.GetLastPInvokeError());
        }

        Send(socketPath, [], handle, SocketConstants.MSG_NOSIGNAL | SocketConstants.MSG_DONTWAIT);
    }

    private static unsafe void Send(string socketPath, byte[] text, SafeHandle? descriptor, int flags)
    {
        ArgumentException.ThrowIfNullOrEmpty(socketPath);
        byte[] path = Encoding.UTF8.GetBytes(socketPath);
        if (path.Length >= MaxPathLength)
        {
            throw new NbdKernelException(socketPath, "sendmsg", Errno.ENAMETOOLONG, $"socket path longer than {MaxPathLength - 1} bytes");
        }

        var address = default(Libc.SockAddrUnix);
        address.Family = SocketConstants.AF_UNIX;
        for (int i = 0; i < path.Length; i++)
        {
            address.Path[i] = path[i];
        }

        // Abstract: the name starts with a NUL byte and has no terminator; a path is NUL-terminated (the zeroed struct).
        if (path[0] == (byte)'@')
        {
            address.Path[0] = 0;
        }

        uint addressLength = (uint)(sizeof(ushort) + path.Length + (path[0] == (byte)'@' ? 0 : 1));
        int fd = Libc.Socket(SocketConstants.AF_UNIX, SocketConstants.SOCK_DGRAM | NetlinkConstants.SOCK_CLOEXEC, 0);
        if (fd < 0)
        {
            throw new NbdKernelException(socketPath, "socket(AF_UNIX, SOCK_DGRAM)", Marshal.GetLastPInvokeError());
        }

        bool added = false;
        try
        {
            descriptor?.DangerousAddRef(ref added);
            fixed (byte* bytes = text)
            {
                var vector = new Libc.IoVector { Base = bytes, Length = (nuint)text.Length };
                var control = new Libc.ControlMessageOneDescriptor
                {
                    Length = (nuint)(sizeof(nuint) + (2 * sizeof(int)) + sizeof(int)),
                    Level = SocketConstants.SOL_SOCKET,
                    Type = SocketConstants.SCM_RIGHTS,
                    Descriptor = descriptor is null ? -1 : (int)descriptor.DangerousGetHandle(),
                };
                var header = new Libc.MessageHeader
                {
                    Name = &address,
                    NameLength = addressLength,
                    Vectors = &vector,
                    VectorCount = 1,
                    Control = descriptor is null ? null : &control,
                    ControlLength = descriptor is null ? 0 : (nuint)sizeof(Libc.ControlMessageOneDescriptor),
                };
                nint sent = Libc.SendMsg(fd, &header, flags);
                if (sent < 0)
                {
                    throw new NbdKernelException(socketPath, "sendmsg", Marshal.GetLastPInvokeError());
                }
            }
        }
        finally
        {
            if (added)
            {
                descriptor!.DangerousRelease();
            }

            _ = Libc.Close(fd);
        }
    }

    /// <summary>
    /// Takes an inherited descriptor (from $LISTEN_FDS) as a connected AF_UNIX stream socket: marks it close-on-exec
    /// (sd_listen_fds leaves that to the receiver) and refuses anything else, so that a descriptor that is not what its
    /// name says is never read as an NBD stream.
    /// </summary>
    /// <exception cref="NbdKernelException">Not an open descriptor, or not an AF_UNIX stream socket.</exception>
    public static unsafe Socket AdoptInheritedStreamSocket(int fd)
    {
        SetCloseOnExec(fd);
        CheckStreamSocket(fd);
        return new Socket(new SafeSocketHandle(fd, ownsHandle: true));
    }

    /// <summary>
    /// Takes an inherited descriptor (from $LISTEN_FDS) of any kind: marks it close-on-exec and returns it owned.
    /// </summary>
    /// <exception cref="NbdKernelException">Not an open descriptor.</exception>
    public static SafeFileHandle AdoptInherited(int fd)
    {
        SetCloseOnExec(fd);
        return new SafeFileHandle(fd, ownsHandle: true);
    }

    /// <summary>Refuses a descriptor that is not an AF_UNIX stream socket.</summary>
    /// <exception cref="NbdKernelException">Not an open descriptor, or not an AF_UNIX stream socket.</exception>
    public static void CheckStreamSocket(SafeHandle descriptor)
    {
        ArgumentNullException.ThrowIfNull(descriptor);
        bool added = false;
        descriptor.DangerousAddRef(ref added);
        try
        {
            CheckStreamSocket((int)descriptor.DangerousGetHandle());
        }
        finally
        {
            descriptor.DangerousRelease();
        }
    }

    /// <summary>A new descriptor for the same open file (F_DUPFD_CLOEXEC), owned by the caller.</summary>
    /// <exception cref="NbdKernelException">fcntl(2) failed (EMFILE: out of descriptors).</exception>
    public static SafeFileHandle Duplicate(SafeHandle descriptor)
    {
        ArgumentNullException.ThrowIfNull(descriptor);
        int copy = Libc.Fcntl(descriptor, PollConstants.F_DUPFD_CLOEXEC, 0);
        if (copy < 0)
        {
            throw new NbdKernelException("descriptor", "fcntl(F_DUPFD_CLOEXEC)", Marshal.GetLastPInvokeError());
        }

        return new SafeFileHandle(copy, ownsHandle: true);
    }

    /// <summary>A new descriptor (F_DUPFD_CLOEXEC) for the stream socket <paramref name="descriptor"/> is, as a Socket the caller owns.</summary>
    /// <exception cref="NbdKernelException">fcntl(2) failed, or it is not an AF_UNIX stream socket.</exception>
    public static Socket DuplicateStreamSocket(SafeHandle descriptor)
    {
        using SafeFileHandle copy = Duplicate(descriptor);
        CheckStreamSocket(copy);
        var handle = new SafeSocketHandle(copy.DangerousGetHandle(), ownsHandle: true);
        copy.SetHandleAsInvalid(); // one owner of the descriptor at any time
        try
        {
            return new Socket(handle);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    private static void SetCloseOnExec(int fd)
    {
        int flags = Libc.Fcntl(fd, SocketConstants.F_GETFD, 0);
        if (flags < 0 || Libc.Fcntl(fd, SocketConstants.F_SETFD, flags | SocketConstants.FD_CLOEXEC) < 0)
        {
            throw new NbdKernelException(Describe(fd), "fcntl(F_SETFD, FD_CLOEXEC)", Marshal.GetLastPInvokeError());
        }
    }

    private static void CheckStreamSocket(int fd)
    {
        string what = Describe(fd);
        int domain = ReadIntOption(fd, SocketConstants.SO_DOMAIN, what);
        int type = ReadIntOption(fd, SocketConstants.SO_TYPE, what);
        if (domain != SocketConstants.AF_UNIX || type != SocketConstants.SOCK_STREAM)
        {
            throw new NbdKernelException(what, "getsockopt(SO_DOMAIN, SO_TYPE)", Errno.ENOTSOCK, $"domain {domain}, type {type}: not an AF_UNIX stream socket");
        }
    }

    private static string Describe(int fd) => "inherited descriptor " + fd.ToString(System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>Closes an inherited descriptor nobody claimed. Never throws.</summary>
    public static void Close(int fd) => _ = Libc.Close(fd);

    private static unsafe int ReadIntOption(int fd, int option, string what)
    {
        int value = 0;
        uint length = sizeof(int);
        if (Libc.GetSockOpt(fd, SocketConstants.SOL_SOCKET, option, &value, &length) < 0)
        {
            throw new NbdKernelException(what, "getsockopt", Marshal.GetLastPInvokeError());
        }

        return value;
    }
}

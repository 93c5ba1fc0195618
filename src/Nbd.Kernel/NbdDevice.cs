using System.Globalization;
using System.Net.Sockets;
using System.Text.RegularExpressions;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel;

/// <summary>
/// The classic ioctl interface to one /dev/nbdN, opened O_RDWR. Typical use (what nbd-client does):
/// <see cref="SetBlockSize"/>, <see cref="SetSizeBytes"/>, <see cref="SetFlags"/>, <see cref="SetTimeout"/>,
/// <see cref="SetSocket"/> (once per connection), then <see cref="StartServiceLoop"/>; the device serves I/O until
/// the loop ends. One instance is one session: after the loop has ended, dispose it and <see cref="Open(string)"/> the path
/// again, because the driver keeps the old session (pid file, sockets) until the last descriptor is closed.
/// </summary>
/// <remarks>
/// Kernel rules worth knowing (drivers/block/nbd.c):
/// <list type="bullet">
/// <item>NBD_SET_SOCK remembers the calling thread (task_setup); a second SET_SOCK from another thread, or on a device
/// that another process is setting up or that netlink owns, fails with EBUSY. Call all SetSocket for one device
/// from one thread.</item>
/// <item>NBD_SET_BLKSIZE keeps the byte size, so set the block size first and the size second.</item>
/// <item>A handled signal delivered to the thread blocked in NBD_DO_IT makes the kernel shut the sockets down and fail
/// every request in flight. A signal sent to the process may land on any thread that does not block it (.NET handles
/// SIGCONT, which systemd sends after SIGTERM at every stop), so <see cref="RunServiceLoop"/> blocks them all on its
/// thread while it waits in the kernel (<see cref="ThreadSignalMask"/>).</item>
/// </list>
/// </remarks>
public sealed partial class NbdDevice : IDisposable
{
    private readonly INbdDeviceControl _control;
    private readonly int _pageSize;
    private uint _blockSize = NbdConstants.DefaultBlockSize;
    private int _stopRequested;
    private int _loopRunning;
    private bool _loopRan;
    private int _disposed;

    /// <summary>An NBD_DISCONNECT of ours never returned: nothing more is asked of the device, only its descriptor closed.</summary>
    private int _disconnectStuck;

    /// <summary>
    /// Our own duplicates (F_DUPFD_CLOEXEC) of the sockets the kernel took (NBD_SET_SOCK), so that a disconnect that cannot
    /// be sent can be cut short even when the caller closed its descriptors after handing them over (the kernel keeps
    /// its own reference, so nothing else tells the caller to keep them).
    /// </summary>
    private readonly List<Socket> _sockets = [];

    /// <summary>NBD_SET_SOCKs since the last NBD_CLEAR_SOCK (under the lock of <see cref="_sockets"/>, which may hold fewer).</summary>
    private int _socketsSet;

    /// <summary>
    /// How long NBD_DISCONNECT may block sending NBD_CMD_DISC before the sockets given to <see cref="SetSocket"/> are shut
    /// down under it (see <see cref="Disconnect"/>).
    /// </summary>
    public static readonly TimeSpan DefaultDisconnectGrace = TimeSpan.FromSeconds(5);

    internal TimeSpan DisconnectGrace { get; set; } = DefaultDisconnectGrace;

    internal NbdDevice(string path, int index, INbdDeviceControl control, int pageSize)
    {
        Path = path;
        Index = index;
        _control = control;
        _pageSize = pageSize;
    }

    /// <summary>"/dev/nbd2".</summary>
    public string Path { get; }

    /// <summary>2 for /dev/nbd2.</summary>
    public int Index { get; }

    /// <summary>The block size set through this instance (the kernel's default, 1024, until <see cref="SetBlockSize"/>).</summary>
    public uint BlockSize => _blockSize;

    /// <summary>Opens an existing /dev/nbdN read-write.</summary>
    /// <exception cref="ArgumentException">The path does not name an nbdN node.</exception>
    /// <exception cref="NbdKernelException">open(2) failed; ENOENT usually means the nbd module is not loaded.</exception>
    public static NbdDevice Open(string path) => Open(path, OpenFile);

    /// <summary>
    /// Opens the first device that looks free in sysfs: no <c>pid</c> file (no NBD_DO_IT running, not netlink-bound)
    /// and size 0. Another client can still claim the same device between this check and NBD_SET_SOCK; the kernel then
    /// refuses our SET_SOCK with EBUSY. <see cref="ClaimUnused(Socket, string, string)"/> handles that by trying the next device.
    /// </summary>
    /// <exception cref="NbdKernelException">No free device (ENODEV), or the driver is not loaded (ENOENT).</exception>
    public static NbdDevice OpenUnused(string sysBlock = "/sys/block", string dev = "/dev") =>
        OpenUnused(sysBlock, dev, OpenFile, Environment.SystemPageSize);

    /// <summary>
    /// <see cref="OpenUnused(string, string)"/> among the devices <paramref name="mayUse"/> allows: it is asked, in index
    /// order, about each device that looks free, before the device is opened (for a caller that shares devices between
    /// several users of its own, e.g. to keep the ones others asked for by name).
    /// </summary>
    /// <exception cref="NbdKernelException">No free device that <paramref name="mayUse"/> allows (ENODEV), or the driver is not loaded (ENOENT).</exception>
    public static NbdDevice OpenUnused(Func<int, bool> mayUse, string sysBlock = "/sys/block", string dev = "/dev")
    {
        ArgumentNullException.ThrowIfNull(mayUse);
        return OpenUnused(sysBlock, dev, path => mayUse(ParseIndex(path)) ? OpenFile(path) : (null, Interop.Errno.EBUSY), Environment.SystemPageSize);
    }

    /// <summary>
    /// <see cref="OpenUnused(string, string)"/> plus NBD_SET_SOCK with <paramref name="socket"/>; a device that another client won in the
    /// meantime (EBUSY) is skipped. Must be called on the thread that will issue any further SetSocket for the device.
    /// </summary>
    public static NbdDevice ClaimUnused(Socket socket, string sysBlock = "/sys/block", string dev = "/dev") =>
        ClaimUnused(socket, sysBlock, dev, OpenFile, Environment.SystemPageSize);

    /// <summary>NBD_SET_SOCK. Only a connected TCP or unix stream socket is passed on (see <see cref="NbdValidation"/>).</summary>
    /// <exception cref="ArgumentException">Wrong kind of socket; the kernel was not called.</exception>
    public void SetSocket(Socket socket)
    {
        NbdValidation.ValidateSockets([socket], required: true, nameof(socket), Remembered());
        NbdValidation.ClearTimeouts([socket]);
        Check(_control.IoctlWithSocket(NbdConstants.NBD_SET_SOCK, socket.SafeHandle), nameof(NbdConstants.NBD_SET_SOCK));
        Remember(socket);
    }

    /// <summary>
    /// NBD_SET_SOCK for each socket (multi-connection; the handshake must have offered NBD_FLAG_CAN_MULTI_CONN or
    /// NBD_DO_IT answers EINVAL). All are validated first, then set from the calling thread, which satisfies the
    /// driver's one-setup-thread rule even for async callers that would otherwise hop threads between calls.
    /// </summary>
    public void SetSockets(IReadOnlyList<Socket> sockets)
    {
        ArgumentNullException.ThrowIfNull(sockets);
        NbdValidation.ValidateSockets(sockets, required: true, nameof(sockets), Remembered());
        NbdValidation.ClearTimeouts(sockets);
        foreach (var socket in sockets)
        {
            Check(_control.IoctlWithSocket(NbdConstants.NBD_SET_SOCK, socket.SafeHandle), nameof(NbdConstants.NBD_SET_SOCK));
            Remember(socket);
        }
    }

    /// <summary>NBD_CLEAR_SOCK: shuts the sockets down and fails queued I/O.</summary>
    public void ClearSocket()
    {
        Ioctl(NbdConstants.NBD_CLEAR_SOCK, 0, nameof(NbdConstants.NBD_CLEAR_SOCK));
        Forget();
    }

    /// <summary>NBD_SET_TIMEOUT in whole seconds; 0 restores the block layer default (30 s).</summary>
    public void SetTimeout(TimeSpan timeout) =>
        Ioctl(NbdConstants.NBD_SET_TIMEOUT, NbdValidation.ToWholeSeconds(timeout, nameof(timeout)), nameof(NbdConstants.NBD_SET_TIMEOUT));

    /// <summary>NBD_SET_BLKSIZE; a power of two from 512 to the page size.</summary>
    public void SetBlockSize(uint bytes)
    {
        NbdValidation.ValidateBlockSize(bytes, _pageSize, nameof(bytes));
        Ioctl(NbdConstants.NBD_SET_BLKSIZE, bytes, nameof(NbdConstants.NBD_SET_BLKSIZE));
        _blockSize = bytes;
    }

    /// <summary>
    /// NBD_SET_SIZE_BLOCKS, in units of <see cref="BlockSize"/>, which is given to the kernel again first: the driver
    /// multiplies by the block size it holds, and a configuration still held by another opener keeps the block size of
    /// its last user (4096, say, where this instance assumes the fresh default 1024: a device four times too large).
    /// </summary>
    public void SetSizeBlocks(ulong blocks)
    {
        // The kernel computes blocks << blksize_bits into a signed loff_t and answers EINVAL on overflow.
        if (blocks > (ulong)long.MaxValue / _blockSize)
        {
            throw new ArgumentOutOfRangeException(nameof(blocks), blocks, $"{blocks} blocks of {_blockSize} bytes overflow the kernel's size.");
        }
        Ioctl(NbdConstants.NBD_SET_BLKSIZE, _blockSize, nameof(NbdConstants.NBD_SET_BLKSIZE));
        Ioctl(NbdConstants.NBD_SET_SIZE_BLOCKS, blocks, nameof(NbdConstants.NBD_SET_SIZE_BLOCKS));
    }

    /// <summary>
    /// Sets the size in bytes, rounded down to a whole number of <see cref="BlockSize"/> blocks (the block layer cannot
    /// address a partial block; nbd-client rounds the same way). Returns the size actually set.
    /// </summary>
    public ulong SetSizeBytes(ulong bytes)
    {
        ulong size = WholeBlocks(bytes, _blockSize);
        SetSizeBlocks(size / _blockSize);
        return size;
    }

    /// <summary>
    /// <paramref name="bytes"/> rounded down to whole blocks: the size a device of that block size can have, by ioctl
    /// (<see cref="SetSizeBytes"/>) or netlink (<c>NBD_ATTR_SIZE_BYTES</c>, which the driver does not round: a partial
    /// last block would fail its reads).
    /// </summary>
    public static ulong WholeBlocks(ulong bytes, uint blockSize)
    {
        ArgumentOutOfRangeException.ThrowIfZero(blockSize);
        return bytes - (bytes % blockSize);
    }

    /// <summary>NBD_SET_FLAGS with the raw transmission flags from the handshake (NBD_FLAG_READ_ONLY, SEND_FLUSH, ...).</summary>
    public void SetFlags(ushort transmissionFlags) =>
        Ioctl(NbdConstants.NBD_SET_FLAGS, transmissionFlags, nameof(NbdConstants.NBD_SET_FLAGS));

    /// <summary>
    /// NBD_DO_IT on the calling thread; blocks until the connection ends. Kernel errors are in the result. Every signal is
    /// blocked on the thread meanwhile (see the remarks on the class).
    /// </summary>
    public NbdServiceLoopResult RunServiceLoop()
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        if (Interlocked.Exchange(ref _loopRunning, 1) != 0)
        {
            throw new InvalidOperationException($"{Path}: the service loop is already running.");
        }
        try
        {
            // The first run on sockets this instance set: the device is ours, so the driver's "already running" EBUSY
            // comes from the restart of an interrupted NBD_DO_IT (see NbdServiceLoopResult.Interrupted for the rare other case).
            bool ours;
            lock (_sockets)
            {
                ours = _socketsSet > 0 && !_loopRan;
                _loopRan = true;
            }

            int errno;
            using (ThreadSignalMask.BlockAll())
            {
                errno = _control.Ioctl(NbdConstants.NBD_DO_IT, 0);
            }

            // The connection is over (the driver shut its sockets down on the way out): our duplicates were only for
            // cutting a stuck disconnect short while it ran, and would keep a dead connection's descriptors open.
            Forget();
            bool stopped = Volatile.Read(ref _stopRequested) != 0;
            return new NbdServiceLoopResult(stopped, errno, errno == 0 ? null : Errno.Name(errno))
            {
                Interrupted = ours && !stopped && errno == Errno.EBUSY,
            };
        }
        finally
        {
            Volatile.Write(ref _loopRunning, 0);
        }
    }

    /// <summary>Runs NBD_DO_IT on a dedicated thread (not the thread pool: it blocks for the connection's lifetime).</summary>
    public NbdServiceLoop StartServiceLoop(string? threadName = null)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        return new NbdServiceLoop(this, threadName ?? $"nbd{Index.ToString(CultureInfo.InvariantCulture)} DO_IT");
    }

    /// <summary>NBD_DISCONNECT: the kernel sends NBD_CMD_DISC to the server; NBD_DO_IT returns once the server closes.</summary>
    /// <remarks>
    /// The driver sends NBD_CMD_DISC under each socket's send lock, which a request send blocked on a server that stopped
    /// reading holds (for the request timeout, or for ever without one: the socket then has no send timeout). After
    /// <see cref="DefaultDisconnectGrace"/> the sockets given to <see cref="SetSocket"/> are shut down, which fails those
    /// sends and lets the disconnect finish, so that a stalled server cannot make a stop hang.
    /// </remarks>
    public void Disconnect()
    {
        Volatile.Write(ref _stopRequested, 1);
        Check(DisconnectBounded(), nameof(NbdConstants.NBD_DISCONNECT));
    }

    private Socket[] Remembered()
    {
        lock (_sockets)
        {
            return [.. _sockets];
        }
    }

    private void Remember(Socket socket)
    {
        int duplicate = Libc.Fcntl(socket.SafeHandle, PollConstants.F_DUPFD_CLOEXEC, 0);
        lock (_sockets)
        {
            _socketsSet++;

            // Out of descriptors: the kernel has the socket all the same; only a stuck disconnect's cut is lost.
            if (duplicate >= 0)
            {
                _sockets.Add(new Socket(new SafeSocketHandle(duplicate, ownsHandle: true)));
            }
        }
    }

    private void Forget()
    {
        lock (_sockets)
        {
            foreach (Socket socket in _sockets)
            {
                socket.Dispose();
            }

            _sockets.Clear();
            _socketsSet = 0;
        }
    }

    /// <summary>NBD_DISCONNECT on a thread of its own, the sockets shut down under it once it took longer than the grace.</summary>
    private int DisconnectBounded()
    {
        int errno = 0;
        System.Runtime.ExceptionServices.ExceptionDispatchInfo? failure = null;
        var thread = new Thread(() =>
        {
            try
            {
                errno = _control.Ioctl(NbdConstants.NBD_DISCONNECT, 0);
            }
#pragma warning disable CA1031 // Rethrown on the caller's thread below.
            catch (Exception e)
#pragma warning restore CA1031
            {
                failure = System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e);
            }
        })
        { IsBackground = true, Name = "nbd" + Index.ToString(CultureInfo.InvariantCulture) + " disconnect" };
        thread.Start();
        if (!thread.Join(DisconnectGrace))
        {
            Socket[] sockets;
            lock (_sockets)
            {
                sockets = [.. _sockets];
            }

            foreach (Socket socket in sockets)
            {
                try
                {
                    socket.Shutdown(SocketShutdown.Both);
                }
                catch (Exception e) when (e is SocketException or ObjectDisposedException)
                {
                    // Already closed by its owner, or no longer connected: nothing left to unblock there.
                }
            }

            if (!thread.Join(DisconnectGrace))
            {
                // Stuck in the driver, holding the device's config_lock: every later ioctl on it would wait behind it.
                Volatile.Write(ref _disconnectStuck, 1);
                return Errno.ETIMEDOUT;
            }
        }

        failure?.Throw();
        return errno;
    }

    /// <summary>
    /// NBD_CLEAR_QUE. Kept for old kernels only: current drivers answer 0 and do nothing, because NBD_DO_IT and
    /// NBD_CLEAR_SOCK already fail the queued requests.
    /// </summary>
    public void ClearQueue() => Ioctl(NbdConstants.NBD_CLEAR_QUE, 0, nameof(NbdConstants.NBD_CLEAR_QUE));

    /// <summary>Stops a running service loop (best effort) and closes the descriptor.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        if (Volatile.Read(ref _loopRunning) != 0 && Volatile.Read(ref _disconnectStuck) == 0)
        {
            RequestStop();
        }
        // The SafeHandle keeps the descriptor open until a blocked NBD_DO_IT has returned.
        _control.Dispose();
        Forget();
    }

    internal void RequestStop()
    {
        Volatile.Write(ref _stopRequested, 1);
        try
        {
            // Errors are expected here (e.g. the loop ended on its own a moment ago); the loop's result reports the outcome.
            // A disconnect still stuck in the kernel holds the device's config_lock, and NBD_CLEAR_SOCK would wait for it
            // in an uninterruptible sleep: only then is it left out.
            if (DisconnectBounded() != Errno.ETIMEDOUT && _control.Ioctl(NbdConstants.NBD_CLEAR_SOCK, 0) == 0)
            {
                Forget();
            }
        }
        catch (ObjectDisposedException)
        {
            // Stop after Dispose: Dispose already stopped the loop and closed the descriptor.
        }
    }

    internal static NbdDevice Open(string path, Func<string, (INbdDeviceControl? Control, int Errno)> opener, int? pageSize = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        int index = ParseIndex(path);
        var (control, errno) = opener(path);
        if (control is null)
        {
            string? hint = errno switch
            {
                Interop.Errno.ENOENT => "no such device node; is the nbd module loaded (modprobe nbd)?",
                Interop.Errno.ENXIO or Interop.Errno.ENODEV => "the driver has no device with this index",
                Interop.Errno.EACCES or Interop.Errno.EPERM => "opening nbd devices needs root (CAP_SYS_ADMIN)",
                _ => null,
            };
            throw new NbdKernelException(path, "open", errno, hint);
        }
        return new NbdDevice(path, index, control, pageSize ?? Environment.SystemPageSize);
    }

    internal static NbdDevice OpenUnused(string sysBlock, string dev, Func<string, (INbdDeviceControl? Control, int Errno)> opener, int pageSize)
    {
        var indexes = NbdSysfs.ListDevices(sysBlock);
        if (indexes.Count == 0)
        {
            throw new NbdKernelException(System.IO.Path.Combine(dev, "nbd*"), "find unused device", Interop.Errno.ENOENT,
                $"no nbd devices in {sysBlock}; is the nbd module loaded (modprobe nbd)?");
        }
        foreach (int index in indexes)
        {
            if (!IsFree(sysBlock, index))
            {
                continue;
            }
            string path = System.IO.Path.Combine(dev, "nbd" + index.ToString(CultureInfo.InvariantCulture));
            var (control, _) = opener(path);
            if (control is null)
            {
                continue; // removed meanwhile (ENXIO) or no node: try the next one
            }
            // Re-check after open: another client may have started between the first look and our open.
            if (IsFree(sysBlock, index))
            {
                return new NbdDevice(path, index, control, pageSize);
            }
            control.Dispose();
        }
        throw new NbdKernelException(System.IO.Path.Combine(dev, "nbd*"), "find unused device", Interop.Errno.ENODEV,
            $"all {indexes.Count} nbd devices are in use");
    }

    internal static NbdDevice ClaimUnused(Socket socket, string sysBlock, string dev, Func<string, (INbdDeviceControl? Control, int Errno)> opener, int pageSize)
    {
        NbdValidation.ValidateSocket(socket, nameof(socket));
        var skipped = new HashSet<int>();
        while (true)
        {
            var device = OpenUnused(sysBlock, dev, path => skipped.Contains(ParseIndex(path)) ? (null, Interop.Errno.EBUSY) : opener(path), pageSize);
            try
            {
                device.SetSocket(socket);
                return device;
            }
            catch (NbdKernelException ex) when (ex.Errno == Interop.Errno.EBUSY)
            {
                skipped.Add(device.Index);
                device.Dispose();
            }
            catch
            {
                device.Dispose();
                throw;
            }
        }
    }

    internal static bool IsFree(string sysBlock, int index)
    {
        try
        {
            return !NbdSysfs.Read(index, sysBlock).IsInUse;
        }
        catch (Exception e) when (e is NbdKernelException or IOException or UnauthorizedAccessException)
        {
            return false; // unreadable sysfs (removed meanwhile, an odd value): not a device to take
        }
    }

    private static (INbdDeviceControl? Control, int Errno) OpenFile(string path)
    {
        var file = NbdDeviceFile.TryOpen(path, out int errno);
        return (file, errno);
    }

    private static int ParseIndex(string path)
    {
        var match = DeviceName().Match(System.IO.Path.GetFileName(path));
        if (!match.Success)
        {
            throw new ArgumentException($"'{path}' does not name an nbd device (expected /dev/nbdN).", nameof(path));
        }
        return int.Parse(match.Groups[1].ValueSpan, NumberStyles.None, CultureInfo.InvariantCulture);
    }

    private void Ioctl(uint request, ulong argument, string name)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        Check(_control.Ioctl(request, argument), name);
    }

    private void Check(int errno, string name)
    {
        if (errno != 0)
        {
            throw new NbdKernelException(Path, name, errno);
        }
    }

    [GeneratedRegex(@"^nbd([0-9]{1,6})$", RegexOptions.CultureInvariant)]
    private static partial Regex DeviceName();
}

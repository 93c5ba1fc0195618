using System.CommandLine;
using System.Globalization;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using Nbd.Kernel;
using Nbd.Protocol;
using NbdDaemon.Mappings;

namespace NbdDaemon.Cli;

/// <summary>
/// <c>nbd-daemon connect URI [DEVICE] [--interface ioctl|netlink] [--block-size N] [--timeout S] [--read-only]</c>:
/// maps one export in the foreground until SIGTERM/SIGINT (then disconnects cleanly and exits 0), the server goes
/// away, or someone disconnects the device.
/// </summary>
internal static class ConnectCommand
{
    public static Command Create()
    {
        var uri = new Argument<string>("uri") { Description = "The export, as an NBD URI (nbd://host[:port]/export, nbd+unix:///export?socket=PATH)" };
        var device = new Argument<string?>("device") { Description = "The device to use (/dev/nbdN); default: an unused one", Arity = ArgumentArity.ZeroOrOne };
        // Any case, as the configuration's Interface; parsed here so that a bad value is named in words, not as
        // "Cannot parse argument 'x' for option '--timeout' as expected type 'System.Nullable`1[System.Int32]'".
        var iface = new Option<string>("--interface")
        {
            Description = "Kernel interface: ioctl or netlink",
            DefaultValueFactory = _ => "ioctl",
            CustomParser = r => r.Tokens[0].Value.ToLowerInvariant() is "ioctl" or "netlink" ? r.Tokens[0].Value.ToLowerInvariant()
                : Refuse<string>(r, $"--interface: '{r.Tokens[0].Value}' is not an interface: ioctl or netlink"),
        };
        var blockSize = new Option<uint?>("--block-size")
        {
            Description = "Logical block size in bytes: a power of two from 512 to 4096 (default: the server's preferred size, else 4096)",
            CustomParser = r => uint.TryParse(r.Tokens[0].Value, NumberStyles.None, CultureInfo.InvariantCulture, out uint bytes) ? bytes
                : Refuse<uint?>(r, $"--block-size: '{r.Tokens[0].Value}' is not a number of bytes (a power of two from 512 to 4096)"),
        };
        var timeout = new Option<int?>("--timeout")
        {
            Description = "Request timeout in seconds, also the deadline for connecting and for the handshake, as a mapping's Timeout (0: the kernel's default; connect and handshake then get 10 s each)",
            CustomParser = r => int.TryParse(r.Tokens[0].Value, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out int seconds) ? seconds
                : Refuse<int?>(r, $"--timeout: '{r.Tokens[0].Value}' is not a whole number of seconds (0 to {MaxTimeoutSeconds})"),
        };
        var readOnly = new Option<bool>("--read-only") { Description = "Map the export read-only even if the server allows writes" };
        var command = new Command("connect", "Map one export to a device in the foreground") { uri, device, iface, blockSize, timeout, readOnly };
        command.SetAction(async (result, ct) =>
        {
            // The root command leaves signals alone (the daemon's host owns them), so the foreground mapping takes
            // SIGTERM and SIGINT itself: they mean "disconnect cleanly and exit 0", not "die now".
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
            using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Stop);
            using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, Stop);
            // The terminal closed (or the session ended): a clean disconnect, not the default death with the device
            // left to the kernel.
            using var sighup = PosixSignalRegistration.Create(PosixSignal.SIGHUP, Stop);
            return await RunAsync(
                new ConnectRequest(
                    result.GetValue(uri)!,
                    result.GetValue(device),
                    result.GetValue(iface) == "netlink",
                    result.GetValue(blockSize),
                    result.GetValue(timeout),
                    result.GetValue(readOnly)),
                Console.Out,
                Console.Error,
                stop.Token);

            void Stop(PosixSignalContext context)
            {
                context.Cancel = true;
                stop.Cancel();
            }
        });
        return command;
    }

    private const int MaxTimeoutSeconds = 86400;

    private static T? Refuse<T>(System.CommandLine.Parsing.ArgumentResult result, string message)
    {
        result.AddError(message);
        return default;
    }

    internal sealed record ConnectRequest(string Uri, string? Device, bool Netlink, uint? BlockSize, int? TimeoutSeconds, bool ReadOnly);

    public static async Task<int> RunAsync(ConnectRequest request, TextWriter stdout, TextWriter stderr, CancellationToken ct)
    {
        if (!NbdUri.TryParse(request.Uri, out var uri, out var why))
        {
            return CliExit.UsageError(stderr, $"invalid NBD URI '{request.Uri}': {why}");
        }

        string? devicePath = null;
        var deviceIndex = -1;
        if (request.Device is not null && !DeviceArgument.TryParse(request.Device, out devicePath, out deviceIndex, out why))
        {
            return CliExit.UsageError(stderr, why!);
        }

        // Up to a day, as a mapping's Timeout: a larger one overflowed the connect deadline's timer (an unhandled
        // ArgumentOutOfRangeException above 4294967 s).
        if (request.TimeoutSeconds is < 0 or > MaxTimeoutSeconds)
        {
            return CliExit.UsageError(stderr, $"--timeout must be from 0 to {MaxTimeoutSeconds} seconds (one day), not {request.TimeoutSeconds}");
        }

        // A block size the kernel cannot take is a bad argument whatever the server says: refused before connecting.
        if (request.BlockSize is uint requested && !BlockSizePolicy.IsValid(requested))
        {
            return CliExit.UsageError(stderr, $"--block-size {requested} is not a power of two from 512 to 4096");
        }

        NbdConnection connection;
        try
        {
            // As a mapping's Timeout: a server that takes longer to accept or to finish the handshake is not one the
            // kernel should wait on for requests either. 0 leaves both to the client's defaults.
            var options = request.TimeoutSeconds is > 0 and { } seconds
                ? new NbdClientOptions { ConnectTimeout = TimeSpan.FromSeconds(seconds), HandshakeTimeout = TimeSpan.FromSeconds(seconds) }
                : null;
            connection = await NbdClient.ConnectAsync(uri!, options, ct);
        }
        catch (NbdException e)
        {
            return CliExit.ServerFailure(stderr, uri!, e);
        }
        catch (OperationCanceledException)
        {
            return CliExit.Error(stderr, $"{uri}: interrupted before the handshake finished");
        }

        using (connection)
        {
            var export = connection.Export;
            if (!TryChooseBlockSize(request.BlockSize, export.BlockSizes, out var blockSize, out why))
            {
                // The user's --block-size outside the server's range is a bad argument (2); the server's own preference
                // or range not fitting the kernel's is a failure (1): there was no argument to fix.
                bool argumentFixes = request.BlockSize is not null && !(export.BlockSizes?.Minimum > BlockSizePolicy.Maximum);
                return argumentFixes ? CliExit.UsageError(stderr, $"{uri}: {why}") : CliExit.Error(stderr, $"{uri}: {why}");
            }

            var flags = export.Flags;
            if (request.ReadOnly)
            {
                flags |= TransmissionFlags.ReadOnly;
            }

            var mapping = new KernelMapping(export.Size, blockSize, flags, request.TimeoutSeconds is { } s ? TimeSpan.FromSeconds(s) : null);
            try
            {
                return request.Netlink
                    ? await ServeNetlinkAsync(connection.Socket, mapping, deviceIndex, uri!, stdout, ct)
                    : await ServeIoctlAsync(connection.Socket, mapping, devicePath, uri!, stdout, ct);
            }
            catch (NbdKernelException e)
            {
                return CliExit.Error(stderr, e.Message);
            }
            catch (ArgumentException e)
            {
                return CliExit.Error(stderr, e.Message);
            }
            catch (OutputFailedException e)
            {
                // Standard output refused a line (a full disk behind a redirection): the device was disconnected on the
                // way out, as after any failure once it was set up (every later line comes after its disconnect).
                return CliExit.Error(stderr, $"{e.Text}; device disconnected");
            }
        }
    }

    internal sealed record KernelMapping(ulong Size, uint BlockSize, TransmissionFlags Flags, TimeSpan? Timeout);

    /// <summary>
    /// The block size we give the kernel: the user's choice, else the server's preferred size, else 4096; it must be one
    /// the kernel takes (a power of two, 512 to 4096) and one the server accepts (within its minimum and maximum).
    /// </summary>
    internal static bool TryChooseBlockSize(uint? requested, BlockSizeConstraints? server, out uint blockSize, out string? error)
    {
        blockSize = BlockSizePolicy.Choose(requested, server?.Preferred);
        error = null;
        if (!BlockSizePolicy.IsValid(blockSize))
        {
            error = $"block size {blockSize} is not a power of two from 512 to 4096";
        }
        else if (server is not null)
        {
            error = BlockSizePolicy.Conflict(requested, blockSize, server.Minimum, server.Maximum, "--block-size");
        }

        return error is null;
    }

    /// <summary>
    /// A named device another client holds (<see cref="NbdDeviceStatus.IsInUse"/>) is refused before any ioctl: the
    /// setup ioctls would resize (or make read-only) a live device before SET_SOCK failed with EBUSY.
    /// </summary>
    private static void RefuseInUse(NbdDevice device)
    {
        NbdDeviceStatus status = NbdSysfs.Read(device.Index);
        if (status.IsInUse)
        {
            string who = status.Backend is { Length: > 0 } backend ? $"backend '{backend}'" : status.Pid is int pid ? $"NBD_DO_IT in thread {pid}" : "a size set";
            throw new NbdKernelException(device.Path, "open", EbusyErrno, $"in use by another client ({who}, {status.SizeBytes} bytes); not touching it");
        }
    }

    private const int EbusyErrno = 16;

    private static async Task<int> ServeIoctlAsync(Socket socket, KernelMapping mapping, string? devicePath, NbdUri uri, TextWriter stdout, CancellationToken ct)
    {
        using var device = devicePath is null ? NbdDevice.OpenUnused() : NbdDevice.Open(devicePath);
        if (devicePath is not null)
        {
            RefuseInUse(device);
        }

        device.SetBlockSize(mapping.BlockSize);
        device.SetSizeBytes(mapping.Size);
        if (mapping.Timeout is { } timeout)
        {
            device.SetTimeout(timeout);
        }

        device.SetFlags((ushort)mapping.Flags);
        device.SetSocket(socket);
        var loop = device.StartServiceLoop($"nbd-do-it {device.Path}");
        Say(stdout, Connected(device.Path, uri, mapping, "ioctl"));

        var stopped = false;
        using (ct.Register(() => { stopped = true; loop.Stop(); }))
        {
            var result = await loop.Completion;
            if (stopped || result.StoppedByRequest)
            {
                SayAfterStop(stdout, $"{device.Path}: disconnected");
                return CliExit.Ok;
            }

            device.ClearQueue();
            device.ClearSocket();
            Say(stdout, $"{device.Path}: the service loop ended ({result.Description ?? result.ErrnoName ?? "the connection was closed: by the server, or NBD_DISCONNECT from elsewhere"}); device released");
            return result.Errno == 0 ? CliExit.Ok : CliExit.Failed;
        }
    }

    private static async Task<int> ServeNetlinkAsync(Socket socket, KernelMapping mapping, int deviceIndex, NbdUri uri, TextWriter stdout, CancellationToken ct)
    {
        using var netlink = NbdNetlink.Open();
        // Joined before CONNECT, so a connection lost right after it is not missed. Without it (the group cannot be
        // joined) a lost connection is not told from a disconnect elsewhere, and the command waits as for the latter.
        using NbdNetlinkEvents? events = TrySubscribe();
        var index = netlink.Connect(new NbdNetlinkConnectRequest
        {
            Index = deviceIndex >= 0 ? deviceIndex : null,
            SizeBytes = NbdDevice.WholeBlocks(mapping.Size, mapping.BlockSize),
            BlockSize = mapping.BlockSize,
            Timeout = mapping.Timeout,
            ServerFlags = (ushort)mapping.Flags,
            Sockets = [socket],
            BackendIdentifier = $"nbd-daemon-cli:{uri}",
        });
        var path = NbdKernel.DevicePath(index);
        using var done = new CancellationTokenSource();
        // Once the device is ours no more (disconnected, here or elsewhere), a failure must not disconnect by index:
        // another client may have configured that index since.
        var released = false;
        try
        {
            Say(stdout, Connected(path, uri, mapping, "netlink"));

            // The kernel owns the socket now; we stay in the foreground so that a signal disconnects, and we leave when
            // the device is disconnected by someone else or its connection is lost. While the connection is up a thread
            // blocked in poll(2) on a duplicate of the socket waits at no cost (the sysfs polling loop this replaces
            // cost seconds of CPU per minute under emulation, see README "Measured figures"); only once the socket
            // ended (NBD_CMD_DISCONNECT shuts it down, as does a lost connection) is sysfs read until the configuration
            // is gone. The socket's end alone cannot tell the two apart, and neither can sysfs: the configuration
            // outlives a disconnect while anyone holds the device open, and a lost connection for good (the kernel
            // keeps a dead device configured, every request failing, until someone disconnects it). LINK_DEAD can: the
            // kernel sends it for a lost connection only, never after a requested disconnect.
            Task<bool> lost = events is null ? new TaskCompletionSource<bool>().Task : WaitForLinkDeadAsync(events, index, done.Token);
            using var watch = NbdSocketWatch.Start([socket]);
            // A failed poll(2) ends this wait too: sysfs is read from then on.
            await Task.WhenAny(watch.Ended, lost).WaitAsync(ct);

            while (NbdSysfs.Read(index).IsConnected)
            {
                if (lost is { IsCompletedSuccessfully: true, Result: true })
                {
                    // Without a dead-connection timeout nothing can bring it back: every request fails with EIO until
                    // someone disconnects, and the device stays busy for a new `connect`. Freed here, as the ioctl path does.
                    netlink.Disconnect(index);
                    released = true;
                    Say(stdout, $"{path}: the connection to {uri} was lost (NBD_CMD_LINK_DEAD); device disconnected");
                    return CliExit.Failed;
                }

                await Task.WhenAny(Task.Delay(TimeSpan.FromMilliseconds(250), ct), lost);
                ct.ThrowIfCancellationRequested();
            }

            released = true;
            Say(stdout, $"{path}: disconnected elsewhere");
            return CliExit.Ok;
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            netlink.Disconnect(index);
            SayAfterStop(stdout, $"{path}: disconnected");
            return CliExit.Ok;
        }
        catch (Exception) when (!released)
        {
            // Whatever failed after CONNECT (stdout gone, out of descriptors for the watch) must not leave a device
            // configured that nobody serves or watches.
            TryDisconnect(netlink, index);
            throw;
        }
        finally
        {
            await done.CancelAsync();
        }
    }

    private static NbdNetlinkEvents? TrySubscribe()
    {
        try
        {
            return NbdNetlinkEvents.Subscribe();
        }
        catch (NbdKernelException)
        {
            return null;
        }
    }

    /// <summary>
    /// True once the kernel reports the connection of device <paramref name="index"/> dead. Events that fail leave it
    /// pending (as without a subscription) until <paramref name="ct"/>, then false: a task completing early would turn
    /// the waits on it into busy loops.
    /// </summary>
    private static async Task<bool> WaitForLinkDeadAsync(NbdNetlinkEvents events, int index, CancellationToken ct)
    {
        try
        {
            while (true)
            {
                int dead;
                try
                {
                    dead = await events.WaitForLinkDeadAsync(ct);
                }
                catch (SocketException e) when (e.SocketErrorCode == SocketError.NoBufferSpaceAvailable)
                {
                    continue; // ENOBUFS: the kernel dropped events for a full socket; the socket itself goes on
                }

                if (dead == index)
                {
                    return true;
                }
            }
        }
        catch (Exception) when (!ct.IsCancellationRequested)
        {
            // NbdKernelException, another SocketException, ObjectDisposedException: no more events, so no LINK_DEAD to
            // wait for.
            await Task.Delay(Timeout.Infinite, ct).ContinueWith(_ => { }, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            return false;
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    private static void TryDisconnect(NbdNetlink netlink, int index)
    {
        try
        {
            netlink.Disconnect(index);
        }
        catch (NbdKernelException)
        {
            // Already gone; the original failure is what the user needs to see.
        }
    }

    /// <summary>One line to standard output, flushed; a refusal (ENOSPC behind a redirection) becomes <see cref="OutputFailedException"/>.</summary>
    private static void Say(TextWriter stdout, string line) => StandardOutput.WriteLine(stdout, line);

    /// <summary>
    /// The last line after a requested stop, best effort: after SIGHUP the terminal is gone (writes fail with EIO), and
    /// the disconnect it asked for has been done, which is what the exit code reports.
    /// </summary>
    private static void SayAfterStop(TextWriter stdout, string line)
    {
        try
        {
            StandardOutput.WriteLine(stdout, line);
        }
        catch (OutputFailedException)
        {
            // Nobody to tell.
        }
    }

    private static string Connected(string path, NbdUri uri, KernelMapping mapping, string iface) =>
        string.Create(CultureInfo.InvariantCulture,
            $"{path}: connected to {uri} over {iface} (size {NbdDevice.WholeBlocks(mapping.Size, mapping.BlockSize)} bytes, block size {mapping.BlockSize}{((mapping.Flags & TransmissionFlags.ReadOnly) != 0 ? ", read-only" : "")})");
}

using Nbd.Kernel.Interop;
using Nbd.Kernel.Netlink;
using static Nbd.Kernel.Interop.NetlinkConstants;

namespace Nbd.Kernel;

/// <summary>
/// The generic netlink family "nbd" (drivers/block/nbd.c, nbd_genl_*): configure and start a device in one request,
/// replace dead sockets, disconnect, list devices. Devices created this way refuse most ioctls (EINVAL), except
/// NBD_DISCONNECT and NBD_CLEAR_SOCK. Every request asks for an ACK, and a negative ACK becomes
/// <see cref="NbdKernelException"/> (with the kernel's extended-ack text where it gives one).
/// </summary>
public sealed class NbdNetlink : IDisposable
{
    private readonly GenericNetlinkClient _client;
    private readonly GenericNetlinkFamily _family;
    private readonly int _pageSize;

    private NbdNetlink(GenericNetlinkClient client, GenericNetlinkFamily family, int pageSize)
    {
        _client = client;
        _family = family;
        _pageSize = pageSize;
    }

    /// <summary>The family id the controller assigned to "nbd" (dynamic, resolved with CTRL_CMD_GETFAMILY).</summary>
    public ushort FamilyId => _family.Id;

    /// <summary>Opens a NETLINK_GENERIC socket and resolves the family.</summary>
    /// <exception cref="NbdKernelException">ENOENT when the nbd module is not loaded.</exception>
    public static NbdNetlink Open() => Open(NetlinkSocket.Open(), Environment.SystemPageSize);

    internal static NbdNetlink Open(INetlinkTransport transport, int pageSize)
    {
        var client = new GenericNetlinkClient(transport);
        try
        {
            return new NbdNetlink(client, GenericNetlinkFamily.Resolve(client, NBD_GENL_FAMILY_NAME), pageSize);
        }
        catch
        {
            client.Dispose();
            throw;
        }
    }

    /// <summary>NBD_CMD_CONNECT; returns the index of the device the kernel configured.</summary>
    /// <exception cref="ArgumentException">Invalid request (no socket, wrong socket kind, bad block size, fractional timeout).</exception>
    /// <exception cref="NbdKernelException">EBUSY: that index is in use; EINVAL: several sockets without CAN_MULTI_CONN, ...</exception>
    public int Connect(NbdNetlinkConnectRequest request)
    {
        ArgumentNullException.ThrowIfNull(request);
        if (request.Index is < 0)
        {
            throw new ArgumentOutOfRangeException(nameof(request), request.Index, "Index must not be negative.");
        }
        NbdValidation.ValidateSockets(request.Sockets, required: true, nameof(request));
        if (request.BlockSize != 0)
        {
            NbdValidation.ValidateBlockSize(request.BlockSize, _pageSize, nameof(request));
        }

        NbdValidation.ValidateSize(request.SizeBytes, request.BlockSize == 0 ? NbdConstants.DefaultBlockSize : request.BlockSize, nameof(request));
        NbdValidation.ValidateBackendIdentifier(request.BackendIdentifier, _pageSize, nameof(request));
        ulong? timeout = request.Timeout is { } t ? NbdValidation.ToWholeSeconds(t, nameof(request)) : null;
        ulong? dead = request.DeadConnectionTimeout is { } d ? NbdValidation.ToWholeSeconds(d, nameof(request)) : null;

        string device = request.Index is int i ? NbdKernel.DevicePath(i) : "netlink nbd";
        NbdValidation.ClearTimeouts(request.Sockets);
        using var lease = SocketDescriptorLease.Acquire(request.Sockets);
        uint sequence = _client.NextSequence();
        var replies = _client.Request(
            NbdNetlinkMessages.BuildConnect(_family.Id, sequence, request, lease.Descriptors, timeout, dead),
            sequence, device, "NBD_CMD_CONNECT");
        foreach (var reply in replies)
        {
            if (reply.Type == _family.Id && Parse(() => NbdNetlinkMessages.ParseConnectReply(reply), device, "NBD_CMD_CONNECT") is int index)
            {
                return index;
            }
        }
        throw new NbdKernelException(device, "NBD_CMD_CONNECT", Errno.EBADMSG, "the kernel acknowledged without naming the device");
    }

    /// <summary>NBD_CMD_DISCONNECT: the kernel sends NBD_CMD_DISC to the server and tears the device down.</summary>
    public void Disconnect(int index)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(index);
        uint sequence = _client.NextSequence();
        _client.Request(NbdNetlinkMessages.BuildDisconnect(_family.Id, sequence, index), sequence, NbdKernel.DevicePath(index), "NBD_CMD_DISCONNECT");
    }

    /// <summary>
    /// NBD_CMD_RECONFIGURE. Only for devices connected through netlink and still running (else EINVAL); sockets only
    /// fill dead slots (see <see cref="NbdNetlinkReconfigureRequest"/>). A device connected with a
    /// BackendIdentifier accepts reconfiguration only when the request repeats it (else EINVAL, seen on 6.1).
    /// </summary>
    public void Reconfigure(NbdNetlinkReconfigureRequest request)
    {
        ArgumentNullException.ThrowIfNull(request);
        ArgumentOutOfRangeException.ThrowIfNegative(request.Index);
        NbdValidation.ValidateSockets(request.Sockets, required: false, nameof(request));
        NbdValidation.ValidateBackendIdentifier(request.BackendIdentifier, _pageSize, nameof(request));
        ulong? timeout = request.Timeout is { } t ? NbdValidation.ToWholeSeconds(t, nameof(request)) : null;
        ulong? dead = request.DeadConnectionTimeout is { } d ? NbdValidation.ToWholeSeconds(d, nameof(request)) : null;

        NbdValidation.ClearTimeouts(request.Sockets ?? []);
        using var lease = SocketDescriptorLease.Acquire(request.Sockets);
        uint sequence = _client.NextSequence();
        _client.Request(
            NbdNetlinkMessages.BuildReconfigure(_family.Id, sequence, request, lease.Descriptors, timeout, dead),
            sequence, NbdKernel.DevicePath(request.Index), "NBD_CMD_RECONFIGURE",
            errno => errno == Errno.EINVAL
                ? "the device must exist, be netlink-connected and running, and BackendIdentifier must repeat the one given at connect"
                : null);
    }

    /// <summary>NBD_CMD_STATUS for one device or (null) all of them. An index the driver does not know yields an empty list.</summary>
    public IReadOnlyList<NbdNetlinkDeviceStatus> Status(int? index = null)
    {
        if (index is < 0)
        {
            throw new ArgumentOutOfRangeException(nameof(index), index, "Index must not be negative.");
        }
        string device = index is int i ? NbdKernel.DevicePath(i) : "netlink nbd";
        uint sequence = _client.NextSequence();
        var replies = _client.Request(NbdNetlinkMessages.BuildStatus(_family.Id, sequence, index), sequence, device, "NBD_CMD_STATUS");
        var result = new List<NbdNetlinkDeviceStatus>();
        foreach (var reply in replies)
        {
            if (reply.Type == _family.Id)
            {
                result.AddRange(Parse(() => NbdNetlinkMessages.ParseStatusReply(reply), device, "NBD_CMD_STATUS"));
            }
        }
        return result;
    }

    public void Dispose() => _client.Dispose();

    private static T Parse<T>(Func<T> parse, string device, string operation)
    {
        try
        {
            return parse();
        }
        catch (NetlinkProtocolException ex)
        {
            throw new NbdKernelException(device, operation, Errno.EBADMSG, ex.Message, ex);
        }
    }
}

namespace Nbd.Protocol;

/// <summary>
/// Size constraints from NBD_INFO_BLOCK_SIZE (proto.md "Size constraints"). Validated on receipt: minimum is a
/// power of two no larger than 64 KiB, preferred a power of two at least max(minimum, 512), maximum at least
/// preferred.
/// </summary>
public sealed record BlockSizeConstraints(uint Minimum, uint Preferred, uint Maximum);

/// <summary>What the handshake learned about the export that transmission will use.</summary>
/// <param name="Name">The server's canonical name (NBD_INFO_NAME) when given, else the name the client asked for.</param>
/// <param name="Size">Export size in bytes.</param>
/// <param name="Flags">Transmission flags; hand them to the kernel as they are.</param>
/// <param name="BlockSizes">Null when the server sent no NBD_INFO_BLOCK_SIZE (oldstyle, EXPORT_NAME, or omitted).</param>
/// <param name="Description">NBD_INFO_DESCRIPTION when the server sent one.</param>
public sealed record NbdExportInfo(string Name, ulong Size, TransmissionFlags Flags, BlockSizeConstraints? BlockSizes, string? Description);

/// <summary>One NBD_REP_SERVER entry from NBD_OPT_LIST.</summary>
/// <param name="Name">The export's name; when the server sent one that is not a spec string, with each byte that is not
/// valid UTF-8 as U+FFFD (and <see cref="NameIsValid"/> false).</param>
/// <param name="Description">The server's description (each invalid byte as U+FFFD: it is only for people).</param>
public sealed record NbdExportListing(string Name, string? Description)
{
    /// <summary>
    /// False when the server sent a name that is not valid UTF-8 or contains NUL (proto.md: names are UTF-8 strings
    /// without NUL): such an export cannot be asked for by name, but one bad entry does not hide the others.
    /// </summary>
    public bool NameIsValid { get; init; } = true;
}

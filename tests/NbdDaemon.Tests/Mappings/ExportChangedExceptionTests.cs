using Nbd.Protocol;
using NbdDaemon.Mappings;

namespace NbdDaemon.Tests.Mappings;

public sealed class ExportChangedExceptionTests
{
    private const ushort Base = ExportDescription.FlagHasFlags | (ushort)(TransmissionFlags.SendFlush | TransmissionFlags.SendFua | TransmissionFlags.SendTrim | TransmissionFlags.SendWriteZeroes);
    private static readonly ExportDescription Before = new("data", Size, Base);

    [Theory]
    [InlineData(Base, false)]
    [InlineData(Base | (ushort)TransmissionFlags.CanMultiConn, false)] // gained a flag
    [InlineData(Base | ExportDescription.FlagReadOnly, true)] // read-only mapping: writability does not matter
    public void Compare_SameDiskForTheKernel_Null(ushort flagsNow, bool mappingReadOnly)
    {
        Assert.Null(ExportChangedException.Compare(Before with { TransmissionFlags = (ushort)(Before.TransmissionFlags | (ushort)TransmissionFlags.Rotational) }, Before with { TransmissionFlags = flagsNow }, mappingReadOnly));
    }

    private const ulong Size = 1UL << 30;

    public static TheoryData<ulong, ushort, string> Changes => new()
    {
        { 1UL << 31, Base, "export size changed from 1073741824 to 2147483648 bytes" },
        { Size, Base | ExportDescription.FlagReadOnly, "export became read-only" },
        { Size, Base & ~(ushort)TransmissionFlags.SendFlush, "export no longer offers NBD_FLAG_SEND_FLUSH, which the kernel was configured to send" },
        { Size, ExportDescription.FlagHasFlags, "export no longer offers NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, which the kernel was configured to send" },
        // Size first: the most important difference is the one named.
        { 512, ExportDescription.FlagHasFlags, "export size changed from 1073741824 to 512 bytes" },
    };

    [Theory]
    [MemberData(nameof(Changes))]
    public void Compare_OtherDisk_NamesTheDifferenceAndKeepsBothExports(ulong size, ushort flags, string reason)
    {
        ExportDescription now = Before with { Size = size, TransmissionFlags = flags };

        ExportChangedException? changed = ExportChangedException.Compare(Before, now, mappingReadOnly: false);

        Assert.NotNull(changed);
        Assert.Equal(reason, changed.Message);
        Assert.Same(Before, changed.Before);
        Assert.Same(now, changed.After);
    }
}

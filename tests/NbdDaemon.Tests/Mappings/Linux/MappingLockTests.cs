using NbdDaemon.Mappings;
using NbdDaemon.Mappings.Linux;

namespace NbdDaemon.Tests.Mappings.Linux;

/// <summary>The abstract unix socket name as a host-wide lock, on this host's real kernel.</summary>
public sealed class MappingLockTests
{
    private readonly string _name = "nbd-daemon:test-" + Guid.NewGuid().ToString("N");

    [Fact]
    public void Take_HeldByAProcess_RefusedNamingTheHolderPidAndTheName()
    {
        using IDisposable held = MappingLock.Take(_name);

        MappingInUseException refused = Assert.Throws<MappingInUseException>(() => MappingLock.Take(_name));

        Assert.Equal(Environment.ProcessId, refused.HolderPid);
        Assert.Contains($"another nbd-daemon process (pid {Environment.ProcessId})", refused.Reason, StringComparison.Ordinal);
        Assert.Contains("@" + _name, refused.Reason, StringComparison.Ordinal);
        Assert.Equal(FailureKind.Transient, refused.Kind);
    }

    [Fact]
    public void Take_AfterTheHolderClosedIt_Succeeds()
    {
        MappingLock.Take(_name).Dispose();

        using IDisposable again = MappingLock.Take(_name);
        Assert.Throws<MappingInUseException>(() => MappingLock.Take(_name));
    }

    [Fact]
    public void Take_OtherNames_Independent()
    {
        using IDisposable first = MappingLock.Take(_name);
        using IDisposable second = MappingLock.Take(_name + "-other");
    }

    [Fact]
    public void FindHolder_NoSuchName_Null()
    {
        Assert.Null(MappingLock.FindHolder(_name));
    }

    [Fact]
    public void FindHolder_ProcWithoutTheName_Null()
    {
        using var proc = new TempDirectory();
        Directory.CreateDirectory(Path.Combine(proc.Path, "net"));
        File.WriteAllText(Path.Combine(proc.Path, "net/unix"),
            "Num       RefCount Protocol Flags    Type St Inode Path\n0000000000000000: 00000002 00000000 00000000 0001 01 4711 @nbd-daemon:other\n");

        Assert.Null(MappingLock.FindHolder(_name, proc.Path));
    }
}

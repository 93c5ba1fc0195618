using System.Diagnostics;
using System.Globalization;
using System.Reflection;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel.Tests.Interop;

/// <summary>
/// Compiles a C program against the installed kernel headers and compares every constant it prints with ours.
/// Needs cc and linux-libc-dev; fails (not skips) without them.
/// </summary>
public sealed class HeaderConstantsTests
{
    private static readonly string[] Headers =
    [
        "sys/ioctl.h", "linux/nbd.h", "linux/nbd-netlink.h", "linux/netlink.h", "linux/genetlink.h", "sys/socket.h", "fcntl.h", "errno.h", "poll.h", "sys/eventfd.h", "sys/stat.h", "stddef.h", "signal.h", "sys/mman.h",
    ];

    // Names whose C spelling differs from a field name, or that are not #defines/enums in a header we include.
    private static readonly HashSet<string> NotInHeaders = new(StringComparer.Ordinal)
    {
        nameof(NbdConstants.DefaultBlockSize), nameof(NbdConstants.MinBlockSize),
        nameof(NetlinkConstants.NBD_GENL_FAMILY_NAME), nameof(NetlinkConstants.NBD_GENL_MCAST_GROUP_NAME), // strings, compared below
    };

    [Fact]
    public void AllConstants_MatchInstalledKernelHeaders()
    {
        var ours = new SortedDictionary<string, ulong>(StringComparer.Ordinal);
        foreach (var type in new[] { typeof(NbdConstants), typeof(NetlinkConstants), typeof(PollConstants), typeof(SocketConstants), typeof(SignalConstants) })
        {
            foreach (var field in type.GetFields(BindingFlags.Public | BindingFlags.Static | BindingFlags.NonPublic))
            {
                if (!field.IsLiteral || NotInHeaders.Contains(field.Name))
                {
                    continue;
                }
                ours[field.Name] = Convert.ToUInt64(field.GetRawConstantValue(), CultureInfo.InvariantCulture);
            }
        }
        foreach (var (value, name) in Errno.All)
        {
            ours[name] = (ulong)value;
        }
        var source = new System.Text.StringBuilder();
        source.AppendLine("#define _GNU_SOURCE"); // POLLRDHUP
        foreach (var header in Headers)
        {
            source.Append("#include <").Append(header).AppendLine(">");
        }
        source.AppendLine("#include <stdio.h>");
        source.AppendLine("int main(void) {");
        foreach (var name in ours.Keys)
        {
            // NLA_TYPE_MASK is ~(flags) as an int in C; every netlink type field is 16 bits wide.
            string cast = name == nameof(NetlinkConstants.NLA_TYPE_MASK) ? "(unsigned short)" : string.Empty;
            source.AppendLine(CultureInfo.InvariantCulture, $"  printf(\"{name}=%llu\\n\", (unsigned long long){cast}({name}));");
        }
        source.AppendLine("  printf(\"NBD_GENL_FAMILY_NAME=%s\\n\", NBD_GENL_FAMILY_NAME);");
        source.AppendLine("  printf(\"NBD_GENL_MCAST_GROUP_NAME=%s\\n\", NBD_GENL_MCAST_GROUP_NAME);");
        source.AppendLine("  printf(\"SIZEOF_SOCKADDR_NL=%zu\\n\", sizeof(struct sockaddr_nl));");
        source.AppendLine("  printf(\"SIZEOF_STAT=%zu\\n\", sizeof(struct stat));");
        source.AppendLine("  printf(\"OFFSETOF_ST_DEV=%zu\\n\", offsetof(struct stat, st_dev));");
        source.AppendLine("  printf(\"OFFSETOF_ST_INO=%zu\\n\", offsetof(struct stat, st_ino));");
        source.AppendLine("  printf(\"SIZEOF_ST_DEV=%zu\\n\", sizeof(((struct stat *)0)->st_dev));");
        source.AppendLine("  printf(\"SIZEOF_ST_INO=%zu\\n\", sizeof(((struct stat *)0)->st_ino));");
        source.AppendLine("  printf(\"SIZEOF_SIGSET_T=%zu\\n\", sizeof(sigset_t));");
        source.AppendLine("  return 0;\n}");

        var printed = CompileAndRun(source.ToString());

        var mismatches = new List<string>();
        foreach (var (name, value) in ours)
        {
            if (!printed.TryGetValue(name, out var text))
            {
                mismatches.Add($"{name}: not printed by the C program");
            }
            else if (text != value.ToString(CultureInfo.InvariantCulture))
            {
                mismatches.Add($"{name}: ours {value}, header {text}");
            }
        }
        Assert.Empty(mismatches);
        Assert.Equal(NetlinkConstants.NBD_GENL_FAMILY_NAME, printed["NBD_GENL_FAMILY_NAME"]);
        Assert.Equal(NetlinkConstants.NBD_GENL_MCAST_GROUP_NAME, printed["NBD_GENL_MCAST_GROUP_NAME"]);
        Assert.Equal(System.Runtime.InteropServices.Marshal.SizeOf<Libc.SockAddrNetlink>().ToString(CultureInfo.InvariantCulture), printed["SIZEOF_SOCKADDR_NL"]);
        // FileIdentity reads st_dev and st_ino as 8-byte values at fixed offsets of a StatBufferSize buffer.
        Assert.True(int.Parse(printed["SIZEOF_STAT"], CultureInfo.InvariantCulture) <= Libc.StatBufferSize, $"struct stat is {printed["SIZEOF_STAT"]} bytes");
        Assert.Equal(Libc.StatDeviceOffset.ToString(CultureInfo.InvariantCulture), printed["OFFSETOF_ST_DEV"]);
        Assert.Equal(Libc.StatInodeOffset.ToString(CultureInfo.InvariantCulture), printed["OFFSETOF_ST_INO"]);
        Assert.Equal("8", printed["SIZEOF_ST_DEV"]);
        Assert.Equal("8", printed["SIZEOF_ST_INO"]);
        // ThreadSignalMask passes pthread_sigmask a SigSetSize buffer.
        Assert.True(int.Parse(printed["SIZEOF_SIGSET_T"], CultureInfo.InvariantCulture) <= Libc.SigSetSize, $"sigset_t is {printed["SIZEOF_SIGSET_T"]} bytes");
        Assert.True(ours.Count > 80, $"only {ours.Count} constants were compared");
    }

    private static Dictionary<string, string> CompileAndRun(string source)
    {
        string dir = Directory.CreateTempSubdirectory("nbd-headers-").FullName;
        try
        {
            string c = Path.Combine(dir, "consts.c");
            string exe = Path.Combine(dir, "consts");
            File.WriteAllText(c, source);
            var (ccExit, ccOutput) = Run("cc", ["-o", exe, c]);
            Assert.True(ccExit == 0, $"cc failed (needs the cc compiler and linux-libc-dev headers):\n{ccOutput}");
            var (exit, output) = Run(exe, []);
            Assert.Equal(0, exit);
            var result = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach (var line in output.Split('\n', StringSplitOptions.RemoveEmptyEntries))
            {
                int eq = line.IndexOf('=', StringComparison.Ordinal);
                result[line[..eq]] = line[(eq + 1)..];
            }
            return result;
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static (int Exit, string Output) Run(string file, string[] arguments)
    {
        var info = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var argument in arguments)
        {
            info.ArgumentList.Add(argument);
        }
        Process process;
        try
        {
            process = Process.Start(info) ?? throw new InvalidOperationException($"could not start {file}");
        }
        catch (System.ComponentModel.Win32Exception ex)
        {
            Assert.Fail($"'{file}' is not installed or not runnable ({ex.Message}); this test needs a C compiler (apt-get install gcc) and linux-libc-dev.");
            throw;
        }
        using (process)
        {
            var stderr = process.StandardError.ReadToEndAsync();
            string stdout = process.StandardOutput.ReadToEnd();
            process.WaitForExit();
            return (process.ExitCode, stdout + stderr.Result);
        }
    }
}

using System.Globalization;
using System.Runtime.InteropServices;

namespace Nbd.Protocol.Tests.Interop.Support;

/// <summary>
/// Signals and inspects a whole process group. Servers are started as group leaders (via setsid) so that forked
/// per-connection children (nbd-server) die with them and no test leaves a process behind.
/// </summary>
internal static partial class ProcessGroups
{
    private const int SigKill = 9;
    private const int SigTerm = 15;

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int Kill(int pid, int signal);

    /// <summary>Live (non-zombie) members of the group, read from /proc.</summary>
    public static IReadOnlyList<int> Members(int pgid)
    {
        var members = new List<int>();
        foreach (string dir in Directory.EnumerateDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), NumberStyles.None, CultureInfo.InvariantCulture, out int pid))
            {
                continue;
            }

            string stat;
            try
            {
                stat = File.ReadAllText(Path.Combine(dir, "stat"));
            }
            catch (IOException)
            {
                continue; // exited while we looked
            }
            catch (UnauthorizedAccessException)
            {
                continue;
            }

            // proc(5): "pid (comm) state ppid pgrp ..."; comm may contain spaces, so parse after the last ')'.
            int close = stat.LastIndexOf(')');
            if (close < 0)
            {
                continue;
            }

            string[] fields = stat[(close + 2)..].Split(' ');
            if (fields.Length > 2 && fields[0] != "Z" && fields[0] != "X"
                && int.TryParse(fields[2], NumberStyles.None, CultureInfo.InvariantCulture, out int group) && group == pgid)
            {
                members.Add(pid);
            }
        }

        return members;
    }

    /// <summary>SIGTERM to the group, then SIGKILL after <paramref name="grace"/>; returns members still alive after that.</summary>
    public static async Task<IReadOnlyList<int>> TerminateAsync(int pgid, TimeSpan grace)
    {
        if (pgid <= 1)
        {
            throw new ArgumentOutOfRangeException(nameof(pgid), pgid, "Refusing to signal a process group <= 1.");
        }

        _ = Kill(-pgid, SigTerm);
        var deadline = DateTime.UtcNow + grace;
        while (Members(pgid).Count > 0 && DateTime.UtcNow < deadline)
        {
            await Task.Delay(25);
        }

        if (Members(pgid).Count > 0)
        {
            _ = Kill(-pgid, SigKill);
            await Task.Delay(200);
        }

        return Members(pgid);
    }
}

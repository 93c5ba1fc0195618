using System.Globalization;
using System.Net.Sockets;

namespace NbdDaemon.Mappings.Linux;

/// <summary>
/// One process per mapping on the host: a unix socket bound to the abstract name <c>@nbd-daemon:NAME</c> (the
/// mapping's backend identifier). The kernel refuses a second bind of the name (EADDRINUSE) and frees it the moment
/// the holder's process ends, SIGKILL included; it needs no writable directory (the unit's ProtectSystem=strict leaves
/// none) and survives no reboot. The name is per network namespace, which a shell and the service share.
/// <c>ss -xlp | grep nbd-daemon:</c> shows who holds which.
/// Why: a second daemon started by hand with the same configuration would adopt the service's netlink devices by
/// their backend identifier, and its Ctrl-C would then disconnect them under the service (and its filesystems).
/// </summary>
internal static class MappingLock
{
    /// <summary>Takes the lock for <paramref name="backendIdentifier"/>; the holder's pid in the failure when it can be found.</summary>
    /// <exception cref="MappingInUseException">Another process holds it.</exception>
    public static IDisposable Take(string backendIdentifier, string procRoot = "/proc")
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Bind(new UnixDomainSocketEndPoint("\0" + backendIdentifier));
            return socket;
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.AddressAlreadyInUse)
        {
            socket.Dispose();
            int? holder = FindHolder(backendIdentifier, procRoot);
            string who = holder is int pid ? string.Create(CultureInfo.InvariantCulture, $"nbd-daemon process (pid {pid})") : "nbd-daemon process";
            throw new MappingInUseException(
                $"mapping is run by another {who} (it holds @{backendIdentifier}); not touching its device, retrying until that process ends", holder);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>The pid whose descriptors include the socket bound to the name, from /proc/net/unix and /proc/PID/fd.</summary>
    internal static int? FindHolder(string backendIdentifier, string procRoot = "/proc")
    {
        try
        {
            string? inode = null;
            // "Num RefCount Protocol Flags Type St Inode Path"; an abstract name is shown with a leading '@'.
            foreach (string line in File.ReadLines(Path.Combine(procRoot, "net/unix")).Skip(1))
            {
                string[] fields = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                if (fields.Length >= 8 && fields[7] == "@" + backendIdentifier)
                {
                    inode = fields[6];
                    break;
                }
            }

            if (inode is null)
            {
                return null;
            }

            string target = $"socket:[{inode}]";
            foreach (string process in Directory.EnumerateDirectories(procRoot))
            {
                if (!int.TryParse(Path.GetFileName(process), NumberStyles.None, CultureInfo.InvariantCulture, out int pid))
                {
                    continue;
                }

                try
                {
                    foreach (string fd in Directory.EnumerateFileSystemEntries(Path.Combine(process, "fd")))
                    {
                        if (new FileInfo(fd).LinkTarget == target)
                        {
                            return pid;
                        }
                    }
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    // a process that ended meanwhile, or one we may not look into
                }
            }

            return null;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null; // only decorates the message
        }
    }
}

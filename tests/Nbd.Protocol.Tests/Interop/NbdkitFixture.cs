using System.Globalization;
using System.Net;
using System.Net.Sockets;
using Nbd.Protocol.Tests.Interop.Support;

namespace Nbd.Protocol.Tests.Interop;

/// <summary>
/// Three nbdkit (Debian package nbdkit) servers, started in parallel:
/// <list type="bullet">
/// <item>TCP, fixed newstyle: file plugin behind blocksize-policy (advertised block sizes) and exportname (two
/// listed names with a fixed description; any other name refused);</item>
/// <item>unix socket: memory plugin of a given size, writable;</item>
/// <item>TCP, oldstyle (-o): file plugin, read-only.</item>
/// </list>
/// </summary>
public sealed class NbdkitFixture : IAsyncLifetime
{
    internal const string DiskExport = "disk";
    internal const string SpareExport = "spare";
    internal const string Description = "interop test disk";
    internal const int FileSize = 2 * 1024 * 1024;
    internal const int OldstyleSize = 768 * 1024;
    internal const int MemorySize = 5 * 1024 * 1024;
    internal const uint BlockMinimum = 512;
    internal const uint BlockPreferred = 4096;
    internal const uint BlockMaximum = 1024 * 1024;

    private ScratchDirectory? _dir;
    private readonly List<ServerProcess> _servers = [];

    public int NewstylePort { get; private set; }

    public int OldstylePort { get; private set; }

    public string SocketPath { get; private set; } = "";

    internal byte[] FileContent { get; private set; } = [];

    internal byte[] OldstyleContent { get; private set; } = [];

    public string NewstyleUri(string export) => $"nbd://127.0.0.1:{NewstylePort}/{export}";

    public string UnixUri(string export) => $"nbd+unix:///{export}?socket={SocketPath}";

    public string OldstyleUri => $"nbd://127.0.0.1:{OldstylePort}";

    public async Task InitializeAsync()
    {
        string tool = ExternalTool.Require("nbdkit", "nbdkit");
        _dir = new ScratchDirectory("nbdkit");
        var (filePath, fileContent) = _dir.CreateFile("disk.img", FileSize, 11);
        var (oldPath, oldContent) = _dir.CreateFile("old.img", OldstyleSize, 12);
        FileContent = fileContent;
        OldstyleContent = oldContent;
        SocketPath = _dir.File("nbdkit.sock");

        // --exit-with-parent: should the test host die without disposing fixtures, nbdkit follows it.
        string[] common = ["--foreground", "--exit-with-parent", "--log=stderr"];
        var newstyle = ServerProcess.OnFreePortAsync(port =>
        {
            NewstylePort = port;
            return ServerProcess.StartForegroundAsync("nbdkit (newstyle, file)", tool,
            [
                .. common, "-i", "127.0.0.1", "-p", port.ToString(CultureInfo.InvariantCulture),
                "--filter=blocksize-policy", "--filter=exportname", "file", $"file={filePath}",
                $"blocksize-minimum={BlockMinimum}", $"blocksize-preferred={BlockPreferred}", $"blocksize-maximum={BlockMaximum}",
                $"exportname={DiskExport}", $"exportname={SpareExport}", "exportname-list=explicit", "exportname-strict=true",
                $"exportdesc=fixed:{Description}",
            ],
            new IPEndPoint(IPAddress.Loopback, port));
        });
        var unix = ServerProcess.StartForegroundAsync("nbdkit (unix, memory)", tool,
            [.. common, "-U", SocketPath, "memory", $"size={MemorySize}"],
            new UnixDomainSocketEndPoint(SocketPath));
        var oldstyle = ServerProcess.OnFreePortAsync(port =>
        {
            OldstylePort = port;
            return ServerProcess.StartForegroundAsync("nbdkit (oldstyle, file)", tool,
                [.. common, "-o", "-r", "-i", "127.0.0.1", "-p", port.ToString(CultureInfo.InvariantCulture), "file", $"file={oldPath}"],
                new IPEndPoint(IPAddress.Loopback, port));
        });

        // Keep whatever started even if another failed, so DisposeAsync stops it.
        foreach (var start in new[] { newstyle, unix, oldstyle })
        {
            try
            {
                _servers.Add(await start);
            }
            catch (ServerStartException)
            {
                await Task.WhenAll(new[] { newstyle, unix, oldstyle }.Select(t => t.ContinueWith(_ => { }, TaskScheduler.Default)));
                foreach (var other in new[] { newstyle, unix, oldstyle })
                {
                    if (other.IsCompletedSuccessfully && !_servers.Contains(other.Result))
                    {
                        _servers.Add(other.Result);
                    }
                }

                throw;
            }
        }
    }

    public async Task DisposeAsync()
    {
        foreach (var server in _servers)
        {
            await server.DisposeAsync();
        }

        _dir?.Dispose();
    }
}

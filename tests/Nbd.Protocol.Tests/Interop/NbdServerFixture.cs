using System.Globalization;
using System.Net;
using System.Text;
using Nbd.Protocol.Tests.Interop.Support;

namespace Nbd.Protocol.Tests.Interop;

/// <summary>
/// nbd-server (Debian package nbd-server, 3.24) with one config declaring several exports on a loopback port.
/// nbd-server has no export descriptions; what differs between exports is size and the flags config turns on.
/// </summary>
public sealed class NbdServerFixture : IAsyncLifetime
{
    internal sealed record Export(string Name, int Size, int Seed, string[] Options);

    internal static readonly Export[] Exports =
    [
        new("alpha", 1024 * 1024, 1, ["flush = true", "fua = true", "trim = true"]),
        new("beta", 3 * 1024 * 1024, 2, ["readonly = true", "rotational = true"]),
        new("gamma", 1536 * 1024, 3, []),
    ];

    private readonly Dictionary<string, byte[]> _content = [];
    private ScratchDirectory? _dir;
    private ServerProcess? _server;

    public int Port { get; private set; }

    public string Uri(string export) => $"nbd://127.0.0.1:{Port}/{export}";

    internal byte[] Content(string export) => _content[export];

    public async Task InitializeAsync()
    {
        string tool = ExternalTool.Require("nbd-server", "nbd-server");
        _dir = new ScratchDirectory("nbd-server");
        foreach (var export in Exports)
        {
            _content[export.Name] = _dir.CreateFile($"{export.Name}.img", export.Size, export.Seed).Content;
        }

        string config = _dir.File("config");
        string pidFile = _dir.File("nbd-server.pid");
        _server = await ServerProcess.OnFreePortAsync(async port =>
        {
            await File.WriteAllTextAsync(config, Config(port));
            File.Delete(pidFile);
            Port = port;
            return await ServerProcess.StartDaemonAsync("nbd-server", tool, ["-C", config, "-p", pidFile], pidFile, new IPEndPoint(IPAddress.Loopback, port));
        });
    }

    private string Config(int port)
    {
        // nbd-server(5): [generic] carries the listener; every other section is an export named by its header.
        // allowlist = true lets clients use NBD_OPT_LIST.
        var text = new StringBuilder();
        text.Append(CultureInfo.InvariantCulture, $"[generic]\n    port = {port}\n    listenaddr = 127.0.0.1\n    allowlist = true\n");
        foreach (var export in Exports)
        {
            text.Append(CultureInfo.InvariantCulture, $"[{export.Name}]\n    exportname = {_dir!.File($"{export.Name}.img")}\n");
            foreach (string option in export.Options)
            {
                text.Append(CultureInfo.InvariantCulture, $"    {option}\n");
            }
        }

        return text.ToString();
    }

    public async Task DisposeAsync()
    {
        if (_server is not null)
        {
            await _server.DisposeAsync();
        }

        _dir?.Dispose();
    }
}

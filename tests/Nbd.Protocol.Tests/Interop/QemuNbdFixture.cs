using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using Nbd.Protocol.Tests.Interop.Support;

namespace Nbd.Protocol.Tests.Interop;

/// <summary>
/// Two qemu-nbd (Debian package qemu-utils) servers: a raw file over loopback TCP with a description, and a
/// qcow2 image (converted from a raw file with known bytes by qemu-img) read-only over a unix socket. Both are
/// persistent (-t) and shared (-e) so each test can open its own connection.
/// </summary>
public sealed class QemuNbdFixture : IAsyncLifetime
{
    internal const string RawExport = "rawdisk";
    internal const string QcowExport = "qdisk";
    internal const string RawDescription = "raw interop disk";
    internal const int RawSize = 1024 * 1024;
    internal const int QcowSize = 3 * 1024 * 1024;

    private ScratchDirectory? _dir;
    private readonly List<ServerProcess> _servers = [];

    public int Port { get; private set; }

    public string SocketPath { get; private set; } = "";

    internal byte[] RawContent { get; private set; } = [];

    internal byte[] QcowContent { get; private set; } = [];

    public string TcpUri(string export) => $"nbd://127.0.0.1:{Port}/{export}";

    public string UnixUri(string export) => $"nbd+unix:///{export}?socket={SocketPath}";

    public async Task InitializeAsync()
    {
        string qemuNbd = ExternalTool.Require("qemu-nbd", "qemu-utils");
        string qemuImg = ExternalTool.Require("qemu-img", "qemu-utils");
        _dir = new ScratchDirectory("qemu-nbd");
        var (rawPath, rawContent) = _dir.CreateFile("disk.raw", RawSize, 21);
        var (sourcePath, qcowContent) = _dir.CreateFile("source.raw", QcowSize, 22);
        RawContent = rawContent;
        QcowContent = qcowContent;
        string qcowPath = _dir.File("disk.qcow2");
        await RunAsync(qemuImg, ["convert", "-f", "raw", "-O", "qcow2", sourcePath, qcowPath]);
        SocketPath = _dir.File("qemu-nbd.sock");

        string[] common = ["--persistent", "--shared=16"];
        _servers.Add(await ServerProcess.OnFreePortAsync(port =>
        {
            Port = port;
            return ServerProcess.StartForegroundAsync("qemu-nbd (raw, tcp)", qemuNbd,
                [.. common, "-f", "raw", "-x", RawExport, "-D", RawDescription, "-b", "127.0.0.1", "-p", port.ToString(CultureInfo.InvariantCulture), rawPath],
                new IPEndPoint(IPAddress.Loopback, port));
        }));
        _servers.Add(await ServerProcess.StartForegroundAsync("qemu-nbd (qcow2, unix, read-only)", qemuNbd,
            [.. common, "-f", "qcow2", "-x", QcowExport, "-r", "-k", SocketPath, qcowPath],
            new UnixDomainSocketEndPoint(SocketPath)));
    }

    private static async Task RunAsync(string tool, IReadOnlyList<string> args)
    {
        var info = new ProcessStartInfo(tool) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string arg in args)
        {
            info.ArgumentList.Add(arg);
        }

        using var process = Process.Start(info)!;
        var stderr = process.StandardError.ReadToEndAsync();
        _ = process.StandardOutput.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await process.WaitForExitAsync(cts.Token);
        if (process.ExitCode != 0)
        {
            throw new InvalidOperationException($"{tool} {string.Join(' ', args)} exited with {process.ExitCode}: {await stderr}");
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

namespace Nbd.Protocol.Tests.Interop.Support;

/// <summary>
/// A private directory for backing files, configs and unix sockets. Short path under /tmp because sun_path holds
/// at most 108 bytes.
/// </summary>
internal sealed class ScratchDirectory : IDisposable
{
    public ScratchDirectory(string prefix)
    {
        Path = Directory.CreateTempSubdirectory($"nbd-{prefix}-").FullName;
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    /// <summary>A backing file of <paramref name="size"/> bytes with seeded pseudo-random content, so reads prove which bytes came back.</summary>
    public (string Path, byte[] Content) CreateFile(string name, int size, int seed)
    {
        var content = new byte[size];
        new Random(seed).NextBytes(content);
        string path = File(name);
        System.IO.File.WriteAllBytes(path, content);
        return (path, content);
    }

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
            // A server still closing its socket file; /tmp is cleaned eventually.
        }
    }
}

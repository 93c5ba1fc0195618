namespace Nbd.Protocol.Tests.Interop.Support;

/// <summary>
/// Finds a server or helper binary on PATH. A missing tool fails the test with the Debian package to install:
/// these tests exist to prove interop with real servers, so skipping would hide exactly what they check.
/// </summary>
internal static class ExternalTool
{
    public static string Require(string name, string debianPackage)
    {
        string? path = Environment.GetEnvironmentVariable("PATH");
        foreach (string dir in (path ?? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").Split(':', StringSplitOptions.RemoveEmptyEntries))
        {
            string candidate = Path.Combine(dir, name);
            if (File.Exists(candidate))
            {
                return candidate;
            }
        }

        throw new InvalidOperationException(
            $"Interop test needs '{name}', which is not on PATH. Install the Debian package '{debianPackage}' (apt-get install -y {debianPackage}).");
    }
}

using System.Runtime.InteropServices;

namespace Nbd.Kernel.Interop;

internal static partial class Libc
{
    /// <summary>memfd_create(2) (glibc 2.27+).</summary>
    [LibraryImport("libc", EntryPoint = "memfd_create", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial int MemfdCreate(string name, uint flags);
}

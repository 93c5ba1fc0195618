using System.Runtime.InteropServices;

namespace Nbd.Kernel.Interop;

/// <summary>An open /dev/nbdN file descriptor. Closing the last one drops the kernel's config reference.</summary>
internal sealed class SafeNbdDeviceHandle : SafeHandle
{
    public SafeNbdDeviceHandle() : base(invalidHandleValue: -1, ownsHandle: true) { }

    internal SafeNbdDeviceHandle(int fd) : this() => SetHandle(fd);

    public override bool IsInvalid => handle < 0;

    protected override bool ReleaseHandle() => Libc.Close((int)handle) == 0;
}

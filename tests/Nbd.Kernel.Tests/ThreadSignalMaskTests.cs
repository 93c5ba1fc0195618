using System.Globalization;
using System.Runtime.InteropServices;
using Nbd.Kernel.Interop;

namespace Nbd.Kernel.Tests;

/// <summary>
/// NBD_DO_IT runs with every signal blocked on its thread: the driver's wait in it is interruptible, and a handled signal
/// that lands on that thread shuts the device's sockets down (the VM step doitsig of daemon-device.sh shows it on the
/// real driver). Here the kernel's wait is stood in for by poll(2), which a handled signal interrupts the same way.
/// </summary>
[System.Runtime.Versioning.SupportedOSPlatform("linux")]
public sealed partial class ThreadSignalMaskTests
{
    private const int SIGHUP = 1, SIGINT = 2, SIGKILL = 9, SIGUSR1 = 10, SIGTERM = 15, SIGCHLD = 17, SIGCONT = 18, SIGSTOP = 19, SIGWINCH = 28;

    [Fact]
    public void BlockAll_EveryBlockableSignalBlocked_MaskPutBackOnDispose()
    {
        ulong before = BlockedMask();
        Assert.Equal(0UL, before & Bit(SIGCONT)); // a test thread starts with SIGCONT deliverable

        ulong during;
        using (ThreadSignalMask.BlockAll())
        {
            during = BlockedMask();
        }

        ulong after = BlockedMask();
        foreach (int signal in new[] { SIGHUP, SIGINT, SIGUSR1, SIGTERM, SIGCHLD, SIGCONT, SIGWINCH, 31, 34, 64 })
        {
            Assert.True((during & Bit(signal)) != 0, $"signal {signal} not blocked: SigBlk {during:x16}");
        }

        Assert.Equal(0UL, during & (Bit(SIGKILL) | Bit(SIGSTOP))); // the kernel never blocks these
        // The thread's own faults stay deliverable: blocked, one would kill the process instead of reaching the runtime.
        foreach (int fault in new[] { 4, 5, 7, 8, 11 })
        {
            Assert.True((during & Bit(fault)) == 0, $"signal {fault} blocked: SigBlk {during:x16}");
        }
        Assert.Equal(before, after);
    }

    [Fact]
    public async Task RunServiceLoop_HandledSignalSentToItsThread_DoesNotInterruptTheWait_DeliveredAfterwards()
    {
        int handled = 0;
        using var registration = PosixSignalRegistration.Create(PosixSignal.SIGCONT, _ => Interlocked.Increment(ref handled));
        var control = new FakeNbdDeviceControl();
        using var device = new NbdDevice("/dev/nbd6", 6, control, 4096);
        int tid = 0;
        using var waiting = new ManualResetEventSlim();
        int pollResult = int.MinValue, pollErrno = 0;
        control.DoItBody = () =>
        {
            tid = GetTid();
            waiting.Set();
            pollResult = Poll(IntPtr.Zero, 0, 1500); // interruptible, like the driver's wait_event_interruptible
            pollErrno = Marshal.GetLastPInvokeError();
            return 0;
        };

        var loop = device.StartServiceLoop("signal test");
        Assert.True(waiting.Wait(TimeSpan.FromSeconds(10)));
        await Task.Delay(100);
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(0, TgKill(Environment.ProcessId, tid, SIGCONT));
            await Task.Delay(50);
        }

        var result = await loop.Completion.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.Equal(0, result.Errno);
        Assert.True(pollResult == 0, $"poll returned {pollResult} (errno {Errno.Name(pollErrno)}): a signal reached the thread in NBD_DO_IT");
        // Not lost: pending on the thread while blocked, handled once the mask was put back.
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(5);
        while (Volatile.Read(ref handled) == 0 && DateTime.UtcNow < deadline)
        {
            await Task.Delay(20);
        }

        Assert.True(Volatile.Read(ref handled) > 0, "SIGCONT was never handled after NBD_DO_IT returned");
    }

    private static ulong Bit(int signal) => 1UL << (signal - 1);

    /// <summary>The calling thread's blocked signals (SigBlk of /proc/thread-self/status; signals 1-64).</summary>
    private static ulong BlockedMask()
    {
        string line = File.ReadLines("/proc/thread-self/status").Single(l => l.StartsWith("SigBlk:", StringComparison.Ordinal));
        return ulong.Parse(line["SigBlk:".Length..].Trim(), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
    }

    [LibraryImport("libc", EntryPoint = "gettid")]
    private static partial int GetTid();

    [LibraryImport("libc", EntryPoint = "tgkill", SetLastError = true)]
    private static partial int TgKill(int pid, int tid, int signal);

    [LibraryImport("libc", EntryPoint = "poll", SetLastError = true)]
    private static partial int Poll(IntPtr fds, nuint count, int timeoutMilliseconds);
}

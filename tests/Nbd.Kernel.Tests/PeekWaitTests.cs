using System.Diagnostics;
using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace Nbd.Kernel.Tests;

/// <summary>
/// The second kernel fact the crash-proof relay's "leave requests in the socket until answered" variant stands on
/// (src/Nbd.Protocol/Transmission/README.md): how one thread can wait for the driver's next request while earlier ones
/// stay unconsumed in the socket. poll(2) cannot (a socket holding unconsumed bytes is always readable, so the thread
/// would spin), and a blocking MSG_PEEK can, but then nothing may consume meanwhile (6.1 computes the peek's skip once,
/// before it sleeps). Edge-triggered epoll can: it reports each arrival once, so the thread sleeps while everything
/// queued has been peeked, wakes on the next bytes, peeks them without blocking, and consumes answered requests itself.
/// </summary>
[System.Runtime.Versioning.SupportedOSPlatform("linux")]
public sealed partial class PeekWaitTests
{
    private const int EPOLL_CLOEXEC = 0x80000, EPOLL_CTL_ADD = 1;
    private const uint EPOLLIN = 0x001, EPOLLET = 1u << 31;
    private const short POLLIN = 0x001;
    private const int MSG_PEEK = 0x2, MSG_DONTWAIT = 0x40;

    [Fact]
    public void Poll_EverythingPeekedNothingConsumed_StillReadable_SoAPollLoopWouldSpin()
    {
        (Socket driver, Socket relay) = NbdSocketPair.Create();
        using (driver)
        using (relay)
        {
            PeekOffsets.Set(relay, 0);
            driver.Send(Bytes(0, 100));
            Assert.Equal(100, Peek(relay, 4096));
            Assert.Equal(0, Peek(relay, 4096)); // nothing new: EAGAIN
            Assert.Equal(1, PollIn(relay, 0)); // yet readable, at once
        }
    }

    [Fact]
    public void EpollEdgeTriggered_EverythingPeeked_SleepsUntilTheNextBytesArrive_ThenPeekGetsExactlyThem()
    {
        (Socket driver, Socket relay) = NbdSocketPair.Create();
        using (driver)
        using (relay)
        {
            int epoll = EpollCreate1(EPOLL_CLOEXEC);
            Assert.True(epoll >= 0, $"epoll_create1: errno {Marshal.GetLastPInvokeError()}");
            try
            {
                Assert.Equal(0, EpollAdd(epoll, relay, EPOLLIN | EPOLLET));
                PeekOffsets.Set(relay, 0);

                driver.Send(Bytes(0, 100));
                Assert.Equal(1, EpollWait(epoll, 1000));
                Assert.Equal(100, Peek(relay, 4096));
                Assert.Equal(0, Peek(relay, 4096));

                // 100 bytes unconsumed, all peeked: the edge was reported, so the wait sleeps.
                Assert.Equal(0, EpollWait(epoll, 300));

                // Consuming (on this thread) does not wake it either, and keeps the peek position where it was.
                Assert.Equal(40, Consume(relay, 40));
                Assert.Equal(60, PeekOffsets.Get(relay));
                Assert.Equal(0, EpollWait(epoll, 100));

                // New bytes from the driver wake it, and the next peek starts exactly at them.
                var clock = Stopwatch.StartNew();
                var late = new Thread(() =>
                {
                    Thread.Sleep(200);
                    driver.Send(Bytes(100, 50));
                });
                late.Start();
                Assert.Equal(1, EpollWait(epoll, 10_000));
                Assert.InRange(clock.ElapsedMilliseconds, 150, 5000);
                late.Join();
                var peeked = new byte[4096];
                int n = Peek(relay, peeked);
                Assert.Equal(50, n);
                Assert.True(peeked.AsSpan(0, n).SequenceEqual(Bytes(100, 50)));

                // Every byte is still there for a reader after a crash: the 60 not consumed, then the 50.
                PeekOffsets.Set(relay, 0);
                Assert.Equal(110, Peek(relay, peeked));
                Assert.True(peeked.AsSpan(0, 110).SequenceEqual(Bytes(40, 110)));
            }
            finally
            {
                _ = CloseFd(epoll);
            }
        }
    }

    private static byte[] Bytes(int position, int count)
    {
        var bytes = new byte[count];
        for (int i = 0; i < count; i++)
        {
            bytes[i] = (byte)((position + i) * 7 + 3);
        }

        return bytes;
    }

    private static int Peek(Socket socket, int size) => Peek(socket, new byte[size]);

    /// <summary>recv(MSG_PEEK | MSG_DONTWAIT) at the socket's peek offset; 0 when nothing new is queued (EAGAIN).</summary>
    private static unsafe int Peek(Socket socket, byte[] buffer)
    {
        fixed (byte* b = buffer)
        {
            nint n = Recv((int)socket.Handle, b, (nuint)buffer.Length, MSG_PEEK | MSG_DONTWAIT);
            if (n < 0)
            {
                int errno = Marshal.GetLastPInvokeError();
                Assert.Equal(11, errno); // EAGAIN
                return 0;
            }

            return (int)n;
        }
    }

    private static unsafe int Consume(Socket socket, int count)
    {
        var buffer = new byte[count];
        fixed (byte* b = buffer)
        {
            return (int)Recv((int)socket.Handle, b, (nuint)count, MSG_DONTWAIT);
        }
    }

    private static unsafe int PollIn(Socket socket, int timeoutMilliseconds)
    {
        // struct pollfd { int fd; short events; short revents; }
        long pollfd = (uint)(int)socket.Handle | ((long)POLLIN << 32);
        return Poll(&pollfd, 1, timeoutMilliseconds);
    }

    private static unsafe int EpollAdd(int epoll, Socket socket, uint events)
    {
        // struct epoll_event is packed on x86-64: uint32 events, uint64 data.
        byte* ev = stackalloc byte[12];
        *(uint*)ev = events;
        *(ulong*)(ev + 4) = 0;
        return EpollCtl(epoll, EPOLL_CTL_ADD, (int)socket.Handle, ev);
    }

    private static unsafe int EpollWait(int epoll, int timeoutMilliseconds)
    {
        byte* events = stackalloc byte[12 * 4];
        return EpollWaitNative(epoll, events, 4, timeoutMilliseconds);
    }


    [LibraryImport("libc", EntryPoint = "recv", SetLastError = true)]
    private static unsafe partial nint Recv(int fd, byte* buffer, nuint length, int flags);

    [LibraryImport("libc", EntryPoint = "poll", SetLastError = true)]
    private static unsafe partial int Poll(long* fds, nuint count, int timeoutMilliseconds);

    [LibraryImport("libc", EntryPoint = "epoll_create1", SetLastError = true)]
    private static partial int EpollCreate1(int flags);

    [LibraryImport("libc", EntryPoint = "epoll_ctl", SetLastError = true)]
    private static unsafe partial int EpollCtl(int epoll, int operation, int fd, byte* ev);

    [LibraryImport("libc", EntryPoint = "epoll_wait", SetLastError = true)]
    private static unsafe partial int EpollWaitNative(int epoll, byte* events, int max, int timeoutMilliseconds);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    private static partial int CloseFd(int fd);
}

using System.Diagnostics;
using System.Net.Sockets;
using TestSupport;
using Xunit.Abstractions;

namespace Nbd.Kernel.Tests;

/// <summary>
/// The kernel behaviour a relay that survives its own SIGKILL would stand on: a unix stream socket's peek offset
/// (SO_PEEK_OFF) drops by exactly the bytes every non-peek recv(2) consumed, inside that recv, so after the reader dies
/// anywhere, even between a recv and its own bookkeeping, the socket itself says where in the stream the reader
/// stopped. (On the driver's pair in the VM: KernelProbeTests.PeekOffset_*.)
/// </summary>
public sealed class PeekOffsetCounterTests(ITestOutputHelper output)
{
    private const int Start = 1 << 30;

    [Fact]
    public void PeekOffset_ReadsInThisProcess_DropsByTheBytesEachReadConsumed()
    {
        (Socket writer, Socket reader) = NbdSocketPair.Create();
        using (writer)
        using (reader)
        {
            // Unset it is -1 and stays so: nothing counts until it is set.
            Assert.Equal(-1, PeekOffsets.Get(reader));
            PeekOffsets.Set(reader, Start);
            writer.Send(Stream(0, 5000));
            var buffer = new byte[5000];
            Assert.Equal(1234, reader.Receive(buffer.AsSpan(0, 1234)));
            Assert.Equal(Start - 1234, PeekOffsets.Get(reader));
            Assert.Equal(5000 - 1234, reader.Receive(buffer));
            Assert.Equal(Start - 5000, PeekOffsets.Get(reader));
            Assert.True(buffer.AsSpan(0, 5000 - 1234).SequenceEqual(Stream(1234, 5000 - 1234)));

            // Setting it again starts a new count; it stops at 0 rather than going negative (so a reader re-arms it).
            PeekOffsets.Set(reader, 100);
            writer.Send(Stream(5000, 300));
            Assert.Equal(300, reader.Receive(buffer));
            Assert.Equal(0, PeekOffsets.Get(reader));
        }
    }

    /// <summary>
    /// cat(1) reads the stream from an inherited descriptor and is SIGKILLed after a random time, mid-stream, 12 times:
    /// each time the counter says how many bytes it consumed, and the socket's next bytes are exactly the stream from
    /// there (the pattern never repeats within the window read back, so an offset off by one byte fails).
    /// </summary>
    [Fact]
    public void PeekOffset_ReaderSigkilledAtARandomMoment_SaysExactlyWhereTheStreamResumes()
    {
        var random = new Random(20261205);
        for (int round = 0; round < 12; round++)
        {
            (Socket writer, Socket reader) = NbdSocketPair.Create();
            using (writer)
            using (reader)
            {
                PeekOffsets.Set(reader, Start);
                const long Total = 16L << 30; // far more than cat reads in 400 ms (≈ 0.6 GB/s here): the kill always lands mid-stream
                var feed = new Thread(() =>
                {
                    try
                    {
                        for (long at = 0; at < Total; at += 64 << 10)
                        {
                            writer.Send(Stream(at, 64 << 10));
                        }
                    }
                    catch (Exception e) when (e is SocketException or ObjectDisposedException)
                    {
                    }
                }) { IsBackground = true, Name = "feed" };
                feed.Start();

                int inherited = Descriptors.Dup((int)reader.Handle); // dup(2) leaves close-on-exec off: cat gets it
                Process cat;
                try
                {
                    cat = ProcessLauncher.Start(new ProcessStartInfo("/bin/bash", ["-c", $"exec cat <&{inherited} >/dev/null"]));
                }
                finally
                {
                    UnixDescriptorPassing.Close(inherited);
                }

                string state;
                using (cat)
                {
                    // cat must have started reading (bash and exec take their time on a loaded host); then a random moment.
                    var started = Stopwatch.StartNew();
                    while (PeekOffsets.Get(reader) == Start && started.Elapsed < TimeSpan.FromSeconds(10))
                    {
                        Thread.Sleep(1);
                    }

                    Thread.Sleep(random.Next(30, 400));
                    state = ProcessState(cat.Id);
                    cat.Kill();
                    Assert.True(cat.WaitForExit(10_000), "cat did not die");
                }

                long consumed = Start - PeekOffsets.Get(reader);
                output.WriteLine($"round {round}: cat was {state} when killed, had consumed {consumed} bytes");
                Assert.True(consumed > 0, $"round {round}: cat consumed nothing before the kill; the test proves nothing");
                Assert.True(consumed < Total, $"round {round}: cat read the whole stream before the kill; the test proves nothing");

                // What is left starts exactly at `consumed`: read the next 1 MiB (the feed keeps the socket supplied).
                int window = (int)Math.Min(1 << 20, Total - consumed);
                var rest = new byte[window];
                reader.ReceiveTimeout = 10_000;
                for (int got = 0; got < window;)
                {
                    int n = reader.Receive(rest.AsSpan(got));
                    Assert.True(n > 0, $"round {round}: the stream ended after {consumed + got} bytes");
                    got += n;
                }

                Assert.True(rest.AsSpan().SequenceEqual(Stream(consumed, window)), $"round {round}: the bytes after the counted {consumed} are not the stream from there");
                reader.Shutdown(SocketShutdown.Both);
                feed.Join(10_000);
            }
        }
    }

    /// <summary>The state letter of /proc/PID/stat just before the kill: R (running, maybe inside a read) or S (asleep).</summary>
    private static string ProcessState(int pid)
    {
        try
        {
            string stat = File.ReadAllText($"/proc/{pid}/stat");
            return stat[(stat.LastIndexOf(')') + 2)..].Split(' ')[0];
        }
        catch (IOException)
        {
            return "gone";
        }
    }

    /// <summary>Stream byte at <paramref name="position"/>: a 64-bit mix of the position, so no short window repeats.</summary>
    private static byte[] Stream(long position, int count)
    {
        var bytes = new byte[count];
        for (int i = 0; i < count; i++)
        {
            ulong x = (ulong)(position + i) * 0x9E3779B97F4A7C15UL;
            bytes[i] = (byte)((x ^ (x >> 29)) >> 24);
        }

        return bytes;
    }
}

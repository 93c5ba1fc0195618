namespace Nbd.Fuzz;

/// <summary>
/// SplitMix64: tiny, allocation-free, and defined here, so a (seed, index) pair names the same stream on every
/// runtime version (System.Random's seeded sequence is an implementation detail).
/// </summary>
internal struct FuzzRandom
{
    private ulong _state;

    public FuzzRandom(ulong seed, long index) => _state = Mix(seed ^ Mix((ulong)index + 0x9E3779B97F4A7C15));

    public ulong NextU64()
    {
        _state += 0x9E3779B97F4A7C15;
        return Mix(_state);
    }

    /// <summary>Uniform in [0, max); max must be positive.</summary>
    public int Next(int max) => (int)(NextU64() % (ulong)max);

    public int Next(int min, int max) => min + Next(max - min);

    public bool OneIn(int n) => Next(n) == 0;

    public uint NextU32() => (uint)(NextU64() >> 32);

    public void Fill(Span<byte> bytes)
    {
        foreach (ref byte b in bytes)
        {
            b = (byte)NextU64();
        }
    }

    /// <summary>Like <see cref="Fill"/> but 8 bytes per step (another sequence: for bulk payloads only).</summary>
    public void FillBulk(Span<byte> bytes)
    {
        while (bytes.Length >= 8)
        {
            System.Buffers.Binary.BinaryPrimitives.WriteUInt64LittleEndian(bytes, NextU64());
            bytes = bytes[8..];
        }

        Fill(bytes);
    }

    public T Pick<T>(ReadOnlySpan<T> items) => items[Next(items.Length)];

    private static ulong Mix(ulong z)
    {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
        return z ^ (z >> 31);
    }
}

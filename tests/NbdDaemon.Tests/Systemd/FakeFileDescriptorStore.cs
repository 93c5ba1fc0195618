using System.Net.Sockets;
using NbdDaemon.Systemd;
using TestSupport;

namespace NbdDaemon.Tests.Systemd;

/// <summary>
/// systemd's store in memory: <see cref="Store"/> keeps a duplicate of the descriptor (what SCM_RIGHTS gives systemd),
/// <see cref="Take"/> hands one back as the next process would inherit it.
/// </summary>
internal sealed class FakeFileDescriptorStore(bool canStore = true, int? capacity = null) : IFileDescriptorStore, IDisposable
{
    private readonly List<(string Name, Socket Socket)> _stored = [];
    private int _reserved;

    public bool CanStore => canStore;

    public int? Capacity => capacity;

    public bool TryReserve()
    {
        lock (_stored)
        {
            if (!canStore || _stored.Count + _reserved >= capacity)
            {
                return false;
            }

            _reserved++;
            return true;
        }
    }

    public void Unreserve()
    {
        lock (_stored)
        {
            _reserved--;
        }
    }

    public IReadOnlyList<string> Names
    {
        get
        {
            lock (_stored)
            {
                return [.. _stored.Select(s => s.Name)];
            }
        }
    }

    public void Store(string name, Socket socket)
    {
        Socket copy = Descriptors.Duplicate(socket);
        lock (_stored)
        {
            _reserved = Math.Max(0, _reserved - 1); // Store uses the room TryReserve made (GiveBack and test set-ups reserve none)
            _stored.Add((name, copy));
        }
    }

    public (string Name, Socket Socket)? Take(string prefix)
    {
        lock (_stored)
        {
            int index = _stored.FindIndex(s => s.Name.StartsWith(prefix, StringComparison.Ordinal));
            if (index < 0)
            {
                return null;
            }

            (string Name, Socket Socket) entry = _stored[index];
            _stored.RemoveAt(index);
            return entry;
        }
    }

    public void GiveBack(string name, Socket socket)
    {
        lock (_stored)
        {
            _stored.Add((name, socket));
        }
    }

    public IReadOnlyList<string> ReleaseUnclaimed(Func<string, bool> which)
    {
        lock (_stored)
        {
            List<(string Name, Socket Socket)> released = [.. _stored.Where(s => which(s.Name))];
            _stored.RemoveAll(s => which(s.Name));
            foreach ((_, Socket socket) in released)
            {
                socket.Dispose();
            }

            return [.. released.Select(s => s.Name)];
        }
    }

    public void Dispose()
    {
        lock (_stored)
        {
            foreach ((_, Socket socket) in _stored)
            {
                socket.Dispose();
            }

            _stored.Clear();
        }
    }
}

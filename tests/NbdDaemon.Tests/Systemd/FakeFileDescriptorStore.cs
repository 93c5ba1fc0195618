using System.Net.Sockets;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using NbdDaemon.Systemd;
using TestSupport;

namespace NbdDaemon.Tests.Systemd;

/// <summary>
/// systemd's store in memory: <see cref="Store(string, SafeHandle)"/> keeps a duplicate of the descriptor (what SCM_RIGHTS gives systemd),
/// <see cref="Take"/> hands one back as the next process would inherit it, and takes it out of the store;
/// <see cref="TakeGroup"/> hands out duplicates of a group and leaves the group in the store (lent until
/// <see cref="ReturnGroup"/> or <see cref="Remove"/>).
/// </summary>
internal sealed class FakeFileDescriptorStore(bool canStore = true, int? capacity = null) : IFileDescriptorStore, IDisposable
{
    private readonly List<Stored> _stored = [];
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

    /// <summary>Room reserved and not used yet.</summary>
    public int Reserved
    {
        get
        {
            lock (_stored)
            {
                return _reserved;
            }
        }
    }

    /// <summary>What systemd's store holds, lent or not.</summary>
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

    public void Store(string name, SafeHandle descriptor)
    {
        var copy = new SafeFileHandle(Descriptors.Dup((int)descriptor.DangerousGetHandle()), ownsHandle: true);
        lock (_stored)
        {
            _reserved = Math.Max(0, _reserved - 1); // Store uses the room TryReserve made (GiveBack and test set-ups reserve none)
            _stored.Add(new Stored(name, copy, null));
        }
    }

    /// <summary>A test's set-up: a copy of <paramref name="socket"/> stored under <paramref name="name"/>.</summary>
    public void Store(string name, Socket socket) => Store(name, socket.SafeHandle);

    public (string Name, Socket Socket)? Take(string prefix)
    {
        lock (_stored)
        {
            int index = _stored.FindIndex(s => !s.Lent && s.Name.StartsWith(prefix, StringComparison.Ordinal) && s.Name.IndexOf('/', prefix.Length) < 0);
            if (index < 0)
            {
                return null;
            }

            Stored entry = _stored[index];
            _stored.RemoveAt(index);
            return (entry.Name, entry.AsSocket());
        }
    }

    public (string Group, SafeFileHandle[] Descriptors)? TakeGroup(string prefix, IReadOnlyList<string> members)
    {
        lock (_stored)
        {
            foreach (Stored candidate in _stored.Where(s => !s.Lent && s.Name.StartsWith(prefix, StringComparison.Ordinal)))
            {
                int slash = candidate.Name.IndexOf('/', prefix.Length);
                if (slash < 0)
                {
                    continue;
                }

                string group = candidate.Name[..slash];
                Stored?[] found = [.. members.Select(m => _stored.FirstOrDefault(s => !s.Lent && s.Name == group + "/" + m))];
                if (found.Any(f => f is null))
                {
                    continue;
                }

                foreach (Stored? member in found)
                {
                    member!.Lent = true;
                }

                return (group, [.. found.Select(f => new SafeFileHandle(Descriptors.Dup((int)f!.Handle.DangerousGetHandle()), ownsHandle: true))]);
            }

            return null;
        }
    }

    public void ReturnGroup(string group, IReadOnlyList<string> members, SafeFileHandle[] descriptors)
    {
        lock (_stored)
        {
            foreach (Stored stored in _stored.Where(s => members.Any(m => s.Name == group + "/" + m)))
            {
                stored.Lent = false;
            }
        }

        foreach (SafeFileHandle descriptor in descriptors)
        {
            descriptor.Dispose();
        }
    }

    public bool Remove(string name)
    {
        List<Stored> removed;
        lock (_stored)
        {
            removed = [.. _stored.Where(s => s.Name == name)];
            _stored.RemoveAll(removed.Contains);
        }

        removed.ForEach(r => r.Dispose());
        return true;
    }

    public void GiveBack(string name, Socket socket)
    {
        lock (_stored)
        {
            _stored.Add(new Stored(name, socket.SafeHandle, socket));
        }
    }

    public IReadOnlyList<string> ReleaseUnclaimed(Func<string, bool> which)
    {
        List<Stored> released;
        lock (_stored)
        {
            released = [.. _stored.Where(s => !s.Lent && which(s.Name))];
            _stored.RemoveAll(released.Contains);
        }

        released.ForEach(r => r.Dispose());
        return [.. released.Select(s => s.Name)];
    }

    /// <summary>A duplicate of what is stored under <paramref name="name"/> (as the next process would inherit it).</summary>
    public SafeFileHandle Inherit(string name)
    {
        lock (_stored)
        {
            return new SafeFileHandle(Descriptors.Dup((int)_stored.Single(s => s.Name == name).Handle.DangerousGetHandle()), ownsHandle: true);
        }
    }

    public void Dispose()
    {
        lock (_stored)
        {
            _stored.ForEach(s => s.Dispose());
            _stored.Clear();
        }
    }

    private sealed class Stored(string name, SafeHandle handle, Socket? socket) : IDisposable
    {
        public string Name { get; } = name;

        public SafeHandle Handle { get; } = handle;

        public bool Lent { get; set; }

        public Socket AsSocket()
        {
            if (socket is not null)
            {
                return socket;
            }

            var taken = new Socket(new SafeSocketHandle(Handle.DangerousGetHandle(), ownsHandle: true));
            Handle.SetHandleAsInvalid();
            return taken;
        }

        public void Dispose()
        {
            if (socket is not null)
            {
                socket.Dispose();
            }
            else
            {
                Handle.Dispose();
            }
        }
    }
}

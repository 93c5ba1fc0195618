using System.Globalization;
using NbdDaemon.Configuration;

namespace NbdDaemon.Mappings;

/// <summary>
/// Which /dev/nbdN belongs to which mapping of this daemon, so that a mapping without <c>Device</c> never picks one that
/// another mapping names (its server may be down at boot: the device looks free, and an fstab entry for it would then
/// mount the wrong export), nor one that another mapping of ours is still setting up (the size and flags the driver
/// takes before NBD_DO_IT have no owner check, and sysfs shows the device free until NBD_DO_IT runs).
/// A device named by <c>Device</c> is its mapping's for the daemon's lifetime; a picked one until that mapping lets it go.
/// </summary>
internal sealed class DeviceClaims
{
    private readonly object _lock = new();
    private readonly Dictionary<int, string> _owners = [];
    private readonly HashSet<int> _named = [];

    public DeviceClaims(IEnumerable<MappingOptions> mappings)
    {
        foreach (MappingOptions mapping in mappings)
        {
            if (IndexOf(mapping.Device) is int index)
            {
                _owners[index] = mapping.Name;
                _named.Add(index);
            }
        }
    }

    /// <summary>For a mapping run on its own (tests, one-off tools): nothing is anybody else's.</summary>
    public static DeviceClaims For(MappingOptions mapping) => new([mapping]);

    /// <summary>Claims <paramref name="index"/> for <paramref name="mapping"/> unless another mapping has it. Idempotent.</summary>
    public bool TryClaim(int index, string mapping)
    {
        lock (_lock)
        {
            if (_owners.TryGetValue(index, out string? owner))
            {
                return owner == mapping;
            }

            _owners[index] = mapping;
            return true;
        }
    }

    /// <summary>Whether any device is named or claimed by a mapping other than <paramref name="mapping"/>.</summary>
    public bool OthersHaveAny(string mapping)
    {
        lock (_lock)
        {
            return _owners.Values.Any(owner => owner != mapping);
        }
    }

    /// <summary>Lets go of every device <paramref name="mapping"/> picked, except <paramref name="keep"/>; named ones stay.</summary>
    public void Release(string mapping, int? keep = null)
    {
        lock (_lock)
        {
            foreach (int index in _owners.Where(o => o.Value == mapping && o.Key != keep && !_named.Contains(o.Key)).Select(o => o.Key).ToList())
            {
                _owners.Remove(index);
            }
        }
    }

    /// <summary>5 for /dev/nbd5 (a configured or opened device path, validated before), null for none.</summary>
    public static int? IndexOf(string? device) =>
        device is null ? null : int.Parse(device.AsSpan("/dev/nbd".Length), NumberStyles.None, CultureInfo.InvariantCulture);
}

using System.Globalization;

namespace Nbd.Fuzz;

internal static class Arguments
{
    public static (FuzzSettings Settings, string? Replay) Parse(string[] args)
    {
        var settings = new FuzzSettings();
        string? replay = null;
        for (int i = 0; i < args.Length; i++)
        {
            string value = i + 1 < args.Length ? args[i + 1] : throw new FormatException($"{args[i]} needs a value.");
            settings = args[i] switch
            {
                "--streams" or "--cases" => settings with { Cases = Long(args[i], value, 1) },
                "--seed" => settings with { Seed = ulong.Parse(value, CultureInfo.InvariantCulture) },
                "--start" => settings with { StartIndex = Long(args[i], value, 0) },
                "--mode" => settings with { Mode = Mode(value) },
                "--parallel" => settings with { Parallel = (int)Long(args[i], value, 1) },
                "--deadline-ms" => settings with { Deadline = TimeSpan.FromMilliseconds(Long(args[i], value, 1)) },
                "--alloc-bound" => settings with { AllocationBound = Long(args[i], value, 1) },
                "--socket-every" => settings with { SocketEvery = (int)Long(args[i], value, 0) },
                "--oracle" => settings with { Oracle = Oracle(value) },
                "--replay" => settings,
                _ => throw new FormatException($"Unknown argument {args[i]}."),
            };
            if (args[i] == "--replay")
            {
                replay = value;
            }

            i++;
        }

        return (settings, replay);
    }

    private static long Long(string name, string value, long minimum) =>
        long.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out long n) && n >= minimum
            ? n
            : throw new FormatException($"{name} takes an integer >= {minimum}, not '{value}'.");

    private static RelayOracle Oracle(string value) => value switch
    {
        "pipelined" => RelayOracle.Pipelined,
        "sequential" => RelayOracle.Sequential,
        "disconnect" => RelayOracle.Disconnect,
        _ => throw new FormatException($"--oracle is pipelined, sequential or disconnect, not '{value}'."),
    };

    private static FuzzMode Mode(string value) => value switch
    {
        "handshake" => FuzzMode.Handshake,
        "reconnect" => FuzzMode.Reconnect,
        "all" => FuzzMode.All,
        "relay" => FuzzMode.Relay,
        _ => throw new FormatException($"--mode is handshake, reconnect, all or relay, not '{value}'."),
    };
}

// Hostile-server fuzzer for the NBD handshake and reconnect paths (issue 6). See README.md.
//   dotnet run -c Release --project tests/Nbd.Fuzz -- --streams 1000000 --seed 1 [--mode handshake|reconnect|all|relay]
//       [--parallel N] [--start INDEX] [--deadline-ms MS] [--alloc-bound BYTES] [--socket-every K] [--oracle pipelined|sequential|disconnect]
//   dotnet run -c Release --project tests/Nbd.Fuzz -- --replay SEED:INDEX [--mode ...]
// Exit code: 0 = no finding, 1 = findings, 2 = bad arguments.
using System.Globalization;
using Nbd.Fuzz;

FuzzSettings settings;
string? replay;
try
{
    (settings, replay) = Arguments.Parse(args);
}
catch (FormatException ex)
{
    Console.Error.WriteLine(ex.Message);
    Console.Error.WriteLine("usage: Nbd.Fuzz [--streams N] [--seed S] [--mode handshake|reconnect|all|relay] [--parallel N] [--start I] [--deadline-ms MS] [--alloc-bound BYTES] [--socket-every K] [--oracle pipelined|sequential|disconnect] | --replay SEED:INDEX [--mode M]");
    return 2;
}

if (replay is not null)
{
    return settings.Mode == FuzzMode.Relay ? RelayReplay.Run(replay, settings, Console.Out) : Replay.Run(replay, settings, Console.Out);
}

if (settings.Mode == FuzzMode.Relay)
{
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
        $"fuzz: seed {settings.Seed}, cases {settings.StartIndex}..{settings.StartIndex + settings.Cases - 1}, mode relay, {RelayEngine.OracleText(settings.Oracle)}, parallel {settings.Parallel}, deadline {settings.Deadline.TotalMilliseconds:0} ms"));
    var relayReport = new RelayEngine(settings, progress: Console.WriteLine).Run();
    RelayEngine.Print(relayReport, settings, Console.Out);
    return relayReport.Findings.Count == 0 ? 0 : 1;
}

Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
    $"fuzz: seed {settings.Seed}, cases {settings.StartIndex}..{settings.StartIndex + settings.Cases - 1}, mode {settings.Mode.ToString().ToLowerInvariant()}, parallel {settings.Parallel}, deadline {settings.Deadline.TotalMilliseconds:0} ms, allocation bound {settings.AllocationBound} B, loopback every {settings.SocketEvery} reconnect cases"));
var report = new FuzzEngine(settings, progress: Console.WriteLine).Run();
Summary.Print(report, settings, Console.Out);
return report.Findings.Count == 0 ? 0 : 1;

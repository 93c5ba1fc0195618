using System.CommandLine;
using System.Globalization;
using Nbd.Kernel;

namespace NbdDaemon.Cli;

/// <summary><c>nbd-daemon check DEVICE</c>: exit 0 when the device is connected, 1 when not, with the reason.</summary>
internal static class CheckCommand
{
    public static Command Create()
    {
        var device = new Argument<string>("device") { Description = "The device (/dev/nbdN)" };
        var command = new Command("check", "Tell whether a device is connected (exit 0) or not (exit 1)") { device };
        command.SetAction(result => Run(result.GetValue(device)!, "/sys/block", Console.Out, Console.Error));
        return command;
    }

    public static int Run(string deviceText, string sysBlock, TextWriter stdout, TextWriter stderr)
    {
        if (!DeviceArgument.TryParse(deviceText, out var path, out var index, out var why))
        {
            return CliExit.UsageError(stderr, why!);
        }

        if (!Directory.Exists(Path.Combine(sysBlock, "nbd" + index.ToString(CultureInfo.InvariantCulture))))
        {
            return Say(stdout, stderr, $"{path}: not connected: no such device (is the nbd module loaded, with enough nbds_max?)", CliExit.Failed);
        }

        var status = NbdSysfs.Read(index, sysBlock);
        if (!status.IsConnected)
        {
            return Say(stdout, stderr, $"{path}: not connected: no client is attached (size {status.SizeBytes})", CliExit.Failed);
        }

        return Say(stdout, stderr, string.Create(CultureInfo.InvariantCulture,
            $"{path}: connected (pid {status.Pid}, size {status.SizeBytes} bytes, block size {status.LogicalBlockSize}{(status.Backend is { Length: > 0 } b ? ", backend " + b : "")})"), CliExit.Ok);
    }

    /// <summary>
    /// The answer, and its exit code, which stays the device's state (0 connected, 1 not) when standard output refuses
    /// the line: scripts test the code; the refusal goes to standard error.
    /// </summary>
    private static int Say(TextWriter stdout, TextWriter stderr, string line, int exit)
    {
        try
        {
            StandardOutput.WriteLine(stdout, line);
        }
        catch (OutputFailedException e)
        {
            CliExit.Error(stderr, e.Text);
        }

        return exit;
    }
}

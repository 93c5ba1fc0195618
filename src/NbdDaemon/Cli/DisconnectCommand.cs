using System.CommandLine;
using Nbd.Kernel;

namespace NbdDaemon.Cli;

/// <summary><c>nbd-daemon disconnect DEVICE</c>: asks the kernel to send the server a disconnect and release the device.</summary>
internal static class DisconnectCommand
{
    public static Command Create()
    {
        var device = new Argument<string>("device") { Description = "The device (/dev/nbdN)" };
        var command = new Command("disconnect", "Disconnect a device") { device };
        command.SetAction(result => Run(result.GetValue(device)!, Console.Out, Console.Error));
        return command;
    }

    public static int Run(string deviceText, TextWriter stdout, TextWriter stderr)
    {
        if (!DeviceArgument.TryParse(deviceText, out var path, out _, out var why))
        {
            return CliExit.UsageError(stderr, why!);
        }

        try
        {
            // NBD_DISCONNECT and NBD_CLEAR_SOCK are the two ioctls the driver also accepts on netlink-configured devices,
            // so this works whichever interface set the device up.
            using var device = NbdDevice.Open(path);
            device.Disconnect();
            device.ClearSocket();
        }
        catch (NbdKernelException e)
        {
            return CliExit.Error(stderr, e.Message);
        }

        try
        {
            StandardOutput.WriteLine(stdout, $"{path}: disconnected");
        }
        catch (OutputFailedException e)
        {
            // The disconnect happened, and the exit code says so; the refused line goes to standard error.
            CliExit.Error(stderr, $"{path}: disconnected, but {e.Text}");
        }

        return CliExit.Ok;
    }
}

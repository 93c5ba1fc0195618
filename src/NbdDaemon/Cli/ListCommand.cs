using System.CommandLine;
using System.Text.Json;
using Nbd.Protocol;

namespace NbdDaemon.Cli;

/// <summary><c>nbd-daemon list URI [--json]</c>: the exports a server offers (NBD_OPT_LIST), one per line.</summary>
internal static class ListCommand
{
    public static Command Create()
    {
        var uri = new Argument<string>("uri") { Description = "The server, as an NBD URI (nbd://host[:port], nbd+unix:///?socket=PATH)" };
        var json = new Option<bool>("--json") { Description = "Print the exports as a JSON array of {name, description}" };
        var command = new Command("list", "List the exports of an NBD server") { uri, json };
        command.SetAction((result, ct) =>
            RunAsync(result.GetValue(uri)!, result.GetValue(json), Console.Out, Console.Error, ct));
        return command;
    }

    public static async Task<int> RunAsync(string uriText, bool json, TextWriter stdout, TextWriter stderr, CancellationToken ct)
    {
        if (!NbdUri.TryParse(uriText, out var uri, out var why))
        {
            return CliExit.UsageError(stderr, $"invalid NBD URI '{uriText}': {why}");
        }

        if (uri!.ExportName.Length > 0)
        {
            // Said, not refused: the URI may have been copied from a mapping, and the listing is what was asked for.
            CliExit.Note(stderr, $"the export '{NbdText.Printable(uri.ExportName)}' in the URI is ignored: list shows every export of the server");
        }

        IReadOnlyList<NbdExportListing> exports;
        try
        {
            exports = await NbdClient.ListExportsAsync(uri!, options: null, ct);
        }
        catch (NbdException e)
        {
            return CliExit.ServerFailure(stderr, uri!, e);
        }

        foreach (var invalid in exports.Where(e => !e.NameIsValid))
        {
            CliExit.Note(stderr, $"the server lists an export whose name is not valid UTF-8 or contains NUL, shown as '{NbdText.Printable(invalid.Name)}' (U+FFFD for each bad byte); it cannot be asked for by name");
        }

        try
        {
            if (json)
            {
                var items = exports.Select(e => new ExportJson(e.Name, e.Description)).ToArray();
                StandardOutput.WriteLine(stdout, JsonSerializer.Serialize(items, CliJsonContext.Default.ExportJsonArray));
            }
            else
            {
                foreach (var export in exports)
                {
                    StandardOutput.WriteLine(stdout, string.IsNullOrEmpty(export.Description) ? NbdText.Printable(export.Name) : $"{NbdText.Printable(export.Name)}\t{NbdText.Printable(export.Description)}");
                }
            }
        }
        catch (OutputFailedException e)
        {
            return CliExit.Error(stderr, e.Text);
        }

        return CliExit.Ok;
    }
}

internal sealed record ExportJson(string Name, string? Description);

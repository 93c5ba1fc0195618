using System.Text.Json.Serialization;

namespace NbdDaemon.Cli;

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, WriteIndented = false)]
[JsonSerializable(typeof(ExportJson[]))]
internal sealed partial class CliJsonContext : JsonSerializerContext;

#!/usr/bin/env bash
# Publishes nbd-daemon self-contained for linux-x64 into DIR (default: ./publish/nbd-daemon).
# Usage: deploy/publish.sh [DIR]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo_root/publish/nbd-daemon}"

dotnet publish "$repo_root/src/NbdDaemon/NbdDaemon.csproj" \
  --configuration Release \
  --runtime linux-x64 \
  --self-contained true \
  -p:PublishSingleFile=true \
  -p:PublishDocumentationFiles=false \
  --output "$out"

cp "$repo_root/README.md" "$out/README.md"
echo "published to $out/nbd-daemon"

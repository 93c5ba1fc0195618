#!/bin/bash
# Publishes the probe and runs it against the real nbd driver in the qemu VM (tests/vm/run-vm.sh).
# Prints the VM's serial console; the RESULT lines are the probe's findings. ~2 min under TCG.
# tests/Vm.Tests/KernelProbeTests.cs does the same and asserts on the lines.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(mktemp -d "${TMPDIR:-/tmp}/nbdprobe.XXXXXX")
trap 'rm -rf "$out"' EXIT
dotnet publish "$here" -c Release -r linux-x64 --self-contained -o "$out/probe" -v quiet -nologo >&2
exec "$root/tests/vm/run-vm.sh" --script "$here/probe-scenario.sh" --app "$out/probe:/opt/probe" \
    --bin nbd-server --timeout 400

#!/bin/bash
# Publishes the probe and runs it against the real nbd driver in the qemu VM (tests/vm/run-vm.sh).
# Prints the VM's serial console; the RESULT lines are the probe's findings. ~2 min under TCG.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(mktemp -d "${TMPDIR:-/tmp}/nbdprobe.XXXXXX")
trap 'rm -rf "$out"' EXIT
dotnet publish "$here" -c Release -r linux-x64 --self-contained -o "$out/app" -v quiet -nologo >&2
# A self-contained app still needs glibc & co.; --add them at the same paths (run-vm.sh does this only for --daemon).
args=()
while read -r lib; do
    args+=(--add "$(readlink -f "$lib"):$lib")
done < <( (ldd "$out/app/Nbd.Kernel.Probe"; for f in "$out"/app/*.so; do ldd "$f"; done) 2>/dev/null \
          | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | sort -u)
exec "$root/tests/vm/run-vm.sh" --script "$here/probe-scenario.sh" --add "$out/app:/opt/probe" "${args[@]}" \
    --bin nbd-server --timeout 400

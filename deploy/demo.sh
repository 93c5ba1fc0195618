#!/usr/bin/env bash
# The demo: nbdkit memory export → nbd-daemon → /dev/nbdX → ext4 → a file written and read back → clean stop.
# Runs directly where this host has the nbd driver (as root); inside the VM tier (qemu, stock Debian kernel)
# where it has not. Needs the packages in .ci/packages.txt (nbdkit, libnbd-bin, e2fsprogs; qemu for the VM).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
publish=$(mktemp -d /tmp/nbd-daemon-demo.XXXXXX)
trap 'rm -rf "$publish"' EXIT

echo "demo: publishing nbd-daemon (self-contained) to $publish"
dotnet publish "$repo/src/NbdDaemon" -c Release -r linux-x64 --self-contained -o "$publish" -v quiet -nologo >/dev/null

if [ -d /sys/module/nbd ] || modprobe nbd 2>/dev/null; then
    echo "demo: this host has the nbd driver: running here"
    # Not exec: the EXIT trap must still remove the published copy (about 86 MB).
    rc=0
    NBD_DAEMON="$publish/nbd-daemon" sh "$repo/deploy/demo-steps.sh" || rc=$?
    exit "$rc"
fi

echo "demo: this host has no nbd driver: running inside a qemu VM with a stock Debian kernel (takes a minute under TCG)"
"$repo/tests/vm/run-vm.sh" --script "$repo/deploy/demo-steps.sh" --daemon "$publish" \
    --bin nbdkit --bin nbdinfo --bin mkfs.ext4 --timeout 600 \
    | sed -n 's/^.*\(demo: .*\)$/\1/p; s/^\(@@NBDVM-END.*\)$/\1/p'

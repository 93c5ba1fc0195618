#!/bin/bash
# Builds the VM tier's C tools (nbd-verify, fault-proxy, thread-signal) static, so they run in the busybox VM without libraries.
#
#   build.sh [OUTDIR]     default OUTDIR: ${TMPDIR:-/tmp}/nbd-vm-tools; prints OUTDIR on stdout
#
# Rebuilds only when a source is newer than its binary; concurrent calls are safe (private temp file + rename). A missing gcc or static glibc is an error, not a skip.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${TMPDIR:-/tmp}/nbd-vm-tools}
command -v gcc >/dev/null || { echo "build.sh: gcc is missing (Debian package gcc)" >&2; exit 1; }
mkdir -p "$out"
for tool in nbd-verify fault-proxy thread-signal; do
    src=$here/$tool.c
    bin=$out/$tool
    if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ] || [ "$0" -nt "$bin" ]; then
        gcc -std=gnu11 -O2 -Wall -Wextra -Werror -static -o "$bin.$$" "$src" \
            || { echo "build.sh: building $tool failed (static glibc: Debian package libc6-dev)" >&2; exit 1; }
        mv "$bin.$$" "$bin"   # atomic: test classes may build at the same time
    fi
done
echo "$out"

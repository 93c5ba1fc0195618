#!/bin/bash
# The fault-injection suite (scenarios/faults.sh) in one VM boot, with its results as a markdown table.
#
#   tests/vm/faults.sh [--full] [--relay] [--timeout S] [--only "S1 S7"] [--daemon PUBLISH_DIR] [--keep-log FILE]
#
# Default (CI) counts: S1 3 kills, S2..S6 one round each, S7 3 stops (~5 min of VM time under TCG).
# --full: S1 20 kills, S2 5, S3 5 (each = cut, reset, stall 2 s, stall 7 s), S4 3, S5 3, S6 3, S7 10 (~22 min).
# --timeout S: the mappings' request Timeout, 1..9 s (default 5; it bounds the stall of a request in flight when a
# connection died, see README "Faults").
# --only: just these scenarios (default: all).
# --relay: every mapping with "Relay": true (the daemon relays between the kernel's socketpair and the server and
# resends the requests in flight when it reconnects); the table's relay column says which ran.
# Without --daemon the daemon is published to a temporary folder first. The C tools are built by tools/build.sh.
# Exit code: run-vm.sh's (0 when the scenario ran to its end); the table is the measurement, the tests
# (tests/Vm.Tests/FaultTests.cs, FaultRelayTests.cs) decide pass/fail.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
full=no relay=no daemon="" keep="" timeout_s="" only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --full) full=yes; shift ;;
        --relay) relay=yes; shift ;;
        --timeout) timeout_s=$2; shift 2
            case "$timeout_s" in [1-9]) ;; *) echo "faults.sh: --timeout takes 1..9 (seconds), not '$timeout_s'" >&2; exit 2 ;; esac ;;
        --only) only=$2; shift 2
            case "$only" in *[!S1-7\ ]*|"") echo "faults.sh: --only takes scenarios S1..S7, not '$only'" >&2; exit 2 ;; esac ;;
        --daemon) daemon=$2; shift 2 ;;
        --keep-log) keep=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "faults.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
command -v nbdkit >/dev/null || { echo "faults.sh: nbdkit is missing on the host (Debian package nbdkit)" >&2; exit 2; }
work=$(mktemp -d "${TMPDIR:-/tmp}/nbd-faults.XXXXXX")
trap 'rm -rf "$work"' EXIT
tools=$("$here/tools/build.sh" "$work/tools")
if [ -z "$daemon" ]; then
    daemon=$work/daemon
    dotnet publish "$repo/src/NbdDaemon" -c Release -r linux-x64 --self-contained -o "$daemon" -nologo >"$work/publish.log" 2>&1 \
        || { cat "$work/publish.log" >&2; exit 2; }
fi
conf=$work/nbd-faults.conf
timeout=900
if [ "$full" = yes ]; then
    echo "ROUNDS_S1=20 ROUNDS_S2=5 ROUNDS_S3=5 ROUNDS_S4=3 ROUNDS_S5=3 ROUNDS_S6=3 ROUNDS_S7=10" > "$conf"
    timeout=3600
else
    : > "$conf"
fi
[ -z "$timeout_s" ] || echo "TIMEOUT_S=$timeout_s" >> "$conf"
[ "$relay" = no ] || echo "RELAY=1" >> "$conf"
[ -z "$only" ] || echo "SCENARIOS=\"$only\"" >> "$conf"
log=${keep:-$work/console.log}
rc=0
"$here/run-vm.sh" --script "$here/scenarios/faults.sh" --daemon "$daemon" --bin nbdkit --timeout $timeout \
    --add "$tools/nbd-verify:/usr/local/bin/nbd-verify" --add "$tools/fault-proxy:/usr/local/bin/fault-proxy" \
    --add "$conf:/etc/nbd-faults.conf" > "$log" 2>&1 || rc=$?
grep -a 'NOTE fault-round' "$log" | sed 's/.*NOTE /NOTE /' || true
echo
echo "| scenario | interface | relay | rounds | app I/O errors | kernel I/O errors | verify failures | max stall after back (ms) | longest gap (ms) | served again |"
echo "|---|---|---|---|---|---|---|---|---|---|"
grep -a 'RESULT fault ' "$log" | sed 's/.*RESULT fault //' | awk '{
    delete v
    for (i = 1; i <= NF; i++) { p = index($i, "="); v[substr($i, 1, p - 1)] = substr($i, p + 1) }
    printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", v["scenario"], v["interface"], v["relay"], v["rounds"],
        v["app_io_errors"], v["kernel_io_errors"], v["verify_failures"], v["max_stall_after_back_ms"], v["max_gap_ms"],
        v["served_again"]
}'
[ "$rc" = 0 ] || echo "faults.sh: run-vm.sh exited $rc (console: ${keep:-kept only with --keep-log})" >&2
exit $rc

#!/bin/bash
# Side-by-side fio figures (not a test): in ONE VM boot, the same nbd-server export mapped by nbd-client (ioctl,
# netlink) and by nbd-daemon (ioctl, netlink). Prints a markdown table with the ratio nbd-daemon / nbd-client.
#
#   bench.sh [--daemon PUBLISH_DIR] [--timeout SECONDS]
# Without --daemon, src/NbdDaemon is published (self-contained) into a temporary folder first.
# Figures come from a TCG-emulated VM on a shared machine: compare the columns, not the absolute numbers.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
daemon=""
timeout=900
while [ $# -gt 0 ]; do
    case "$1" in
        --daemon) daemon=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        *) echo "bench: unknown argument $1" >&2; exit 2 ;;
    esac
done
work=$(mktemp -d /tmp/nbd-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
if [ -z "$daemon" ]; then
    daemon="$work/publish"
    echo "bench: publishing nbd-daemon to $daemon" >&2
    dotnet publish "$repo/src/NbdDaemon" -c Release -r linux-x64 --self-contained -o "$daemon" -nologo -v quiet >&2
fi

cat > "$work/scenario.sh" <<'SCENARIO'
. /usr/local/lib/nbdvm.sh
truncate -s 256M /tmp/bench.img
start_nbd_server 10809 bench /tmp/bench.img || note "nbd-server did not start"
# fio terse v3: field 7 read KiB/s, 8 read IOPS, 48 write KiB/s, 49 write IOPS.
jobs() { # CLIENT MODE
    local dev=/dev/nbd0 out
    out=$(fio --name=seqwrite --filename=$dev --rw=write --bs=1M --direct=1 --ioengine=psync --size=128M \
          --output-format=terse --terse-version=3 2>/dev/null)
    result bench client=$1 mode=$2 job=seqwrite-1M mibps=$(echo "$out" | awk -F';' '{printf "%.1f", $48/1024}') \
        iops=$(echo "$out" | awk -F';' '{print $49}')
    out=$(fio --name=seqread --filename=$dev --rw=read --bs=1M --direct=1 --ioengine=psync --size=128M \
          --output-format=terse --terse-version=3 2>/dev/null)
    result bench client=$1 mode=$2 job=seqread-1M mibps=$(echo "$out" | awk -F';' '{printf "%.1f", $7/1024}') \
        iops=$(echo "$out" | awk -F';' '{print $8}')
    out=$(fio --name=randread --filename=$dev --rw=randread --bs=4k --direct=1 --ioengine=libaio --iodepth=16 \
          --size=256M --runtime=10 --time_based --output-format=terse --terse-version=3 2>/dev/null)
    result bench client=$1 mode=$2 job=randread-4k-qd16 mibps=$(echo "$out" | awk -F';' '{printf "%.1f", $7/1024}') \
        iops=$(echo "$out" | awk -F';' '{print $8}')
}
for mode in ioctl netlink; do
    flag=""; [ $mode = ioctl ] && flag=-L
    if nbd-client 127.0.0.1 10809 /dev/nbd0 -N bench $flag >/dev/null 2>&1 && wait_connected nbd0 10 >/dev/null; then
        jobs nbd-client $mode
    else note "nbd-client $mode did not connect"; fi
    nbd-client -d /dev/nbd0 >/dev/null 2>&1; wait_free nbd0 10 >/dev/null
done
for mode in ioctl netlink; do
    daemon_connect /tmp/bench-$mode.log nbd://127.0.0.1:10809/bench /dev/nbd0 --interface $mode
    if wait_connected nbd0 60 $DPID >/dev/null; then
        jobs nbd-daemon $mode
    else note "nbd-daemon $mode did not connect"; show_log /tmp/bench-$mode.log; fi
    daemon_kill $DPID TERM; wait_free nbd0 10 >/dev/null
done
SCENARIO

"$here/run-vm.sh" --script "$work/scenario.sh" --daemon "$daemon" --bin nbd-server --bin nbd-client --bin fio \
    --timeout "$timeout" > "$work/serial.log" || true
grep -E 'RESULT bench|NOTE|LOG ' "$work/serial.log" >&2 || true

awk '
/RESULT bench / {
    line = substr($0, index($0, "RESULT bench ") + 13)
    n = split(line, kv, " "); delete f
    for (i = 1; i <= n; i++) { split(kv[i], p, "="); f[p[1]] = p[2] }
    v[f["job"] "|" f["client"] "|" f["mode"]] = f["mibps"] " MiB/s (" f["iops"] " IOPS)"
    m[f["job"] "|" f["client"] "|" f["mode"]] = f["mibps"]
    if (!(f["job"] in seen)) { seen[f["job"]] = 1; order[++jobs] = f["job"] }
}
function cell(j, c, mo) { k = j "|" c "|" mo; return (k in v) ? v[k] : "n/a" }
function ratio(j, mo) { a = m[j "|nbd-daemon|" mo]; b = m[j "|nbd-client|" mo]
    return (a != "" && b != "" && b + 0 > 0) ? sprintf("%.2f", a / b) : "n/a" }
END {
    print "| job | nbd-client ioctl | nbd-daemon ioctl | ratio ioctl | nbd-client netlink | nbd-daemon netlink | ratio netlink |"
    print "|---|---|---|---|---|---|---|"
    for (i = 1; i <= jobs; i++) { j = order[i]
        printf "| %s | %s | %s | %s | %s | %s | %s |\n", j, cell(j, "nbd-client", "ioctl"), cell(j, "nbd-daemon", "ioctl"), ratio(j, "ioctl"),
            cell(j, "nbd-client", "netlink"), cell(j, "nbd-daemon", "netlink"), ratio(j, "netlink") }
}' "$work/serial.log"

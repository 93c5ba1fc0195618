#!/bin/bash
# Side-by-side fio figures (not a test): in ONE VM boot, the same nbd-server export mapped by nbd-client (ioctl,
# netlink), by nbd-daemon (ioctl, netlink: `connect`, the kernel on the server's TCP socket) and by nbd-daemon with
# the relay (ioctl, netlink: the host with one mapping, "Relay": true, every byte through the daemon). Prints a
# markdown table with the ratios nbd-daemon / nbd-client and relay / nbd-daemon (the relay's cost).
#
#   bench.sh [--daemon PUBLISH_DIR] [--timeout SECONDS]
# Without --daemon, src/NbdDaemon is published (self-contained) into a temporary folder first.
# Figures come from a TCG-emulated VM on a shared machine: compare the columns, not the absolute numbers.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
daemon=""
timeout=1800
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
RUNTIME=8
# Each job is time-based, so both clients get the same measuring window.
job() { # CLIENT MODE ROUND NAME fio-args...
    local client=$1 mode=$2 round=$3 name=$4 out; shift 4
    out=$(fio --name=$name --filename=/dev/nbd0 --direct=1 --size=128M --runtime=$RUNTIME --time_based \
          --output-format=terse --terse-version=3 "$@" 2>/dev/null)
    # terse v3: field 7 read KiB/s, 8 read IOPS, 48 write KiB/s, 49 write IOPS.
    echo "$out" | awk -F';' -v c=$client -v m=$mode -v r=$round -v j=$name \
        '{ w = ($48 > 0); printf "RESULT bench client=%s mode=%s round=%s job=%s mibps=%.1f iops=%s\n", c, m, r, j, (w ? $48 : $7) / 1024, (w ? $49 : $8) }'
}
jobs() { # CLIENT MODE ROUND
    job "$@" seqwrite-1M --rw=write --bs=1M --ioengine=psync
    job "$@" seqread-1M --rw=read --bs=1M --ioengine=psync
    job "$@" randread-4k-qd16 --rw=randread --bs=4k --ioengine=libaio --iodepth=16
}
with_client() { # MODE ROUND
    local flag=""; [ $1 = ioctl ] && flag=-L
    if nbd-client 127.0.0.1 10809 /dev/nbd0 -N bench $flag >/dev/null 2>&1 && wait_connected nbd0 10 >/dev/null; then
        sleep 3; jobs nbd-client "$@"
    else note "nbd-client $1 did not connect"; fi
    nbd-client -d /dev/nbd0 >/dev/null 2>&1; wait_free nbd0 10 >/dev/null
}
with_daemon() { # MODE ROUND
    daemon_connect /tmp/bench-$1.log nbd://127.0.0.1:10809/bench /dev/nbd0 --interface $1
    if wait_connected nbd0 60 $DPID >/dev/null; then
        # The same 3 s settle as nbd-client gets: a cold .NET start finishes its background JIT work meanwhile.
        sleep 3; jobs nbd-daemon "$@"
    else note "nbd-daemon $1 did not connect"; show_log /tmp/bench-$1.log; fi
    daemon_kill $DPID TERM; wait_free nbd0 10 >/dev/null
}
with_relay() { # MODE ROUND: the daemon's host, one mapping with Relay on (the connect verb has no relay)
    local iface=Ioctl; [ $1 = netlink ] && iface=Netlink
    mkdir -p /etc/nbd-daemon
    echo "{ \"Nbd\": { \"Mappings\": [ { \"Name\": \"bench\", \"Uri\": \"nbd://127.0.0.1:10809/bench\", \"Device\": \"/dev/nbd0\", \"Interface\": \"$iface\", \"Relay\": true } ] } }" \
        > /etc/nbd-daemon/appsettings.json
    nbd-daemon > /tmp/bench-relay-$1.log 2>&1 &
    DPID=$!
    if wait_connected nbd0 90 $DPID >/dev/null; then
        sleep 3; jobs nbd-daemon-relay "$@"
    else note "nbd-daemon relay $1 did not connect"; show_log /tmp/bench-relay-$1.log; fi
    daemon_kill $DPID TERM; wait_free nbd0 10 >/dev/null
}
# Three rounds that alternate the order (client, daemon, relay; then backwards), so a drift in the host's load does
# not favour one side; the table shows the median of the rounds.
for round in 1 2 3; do
    for mode in ioctl netlink; do
        if [ $((round % 2)) = 1 ]; then with_client $mode $round; with_daemon $mode $round; with_relay $mode $round
        else with_relay $mode $round; with_daemon $mode $round; with_client $mode $round; fi
    done
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
    k = f["job"] "|" f["client"] "|" f["mode"]
    cnt[k]++; mib[k, cnt[k]] = f["mibps"] + 0; iops[k, cnt[k]] = f["iops"] + 0
    if (!(f["job"] in seen)) { seen[f["job"]] = 1; order[++jobs] = f["job"] }
}
function median(arr, k, n,    i, j, t, a) {
    for (i = 1; i <= n; i++) a[i] = arr[k, i]
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function cell(j, c, mo,    k) { k = j "|" c "|" mo; if (!(k in cnt)) return "n/a"
    m[k] = median(mib, k, cnt[k]); return sprintf("%.1f MiB/s (%d IOPS)", m[k], median(iops, k, cnt[k])) }
function ratio(j, over, under, mo,    a, b) { a = m[j "|" over "|" mo]; b = m[j "|" under "|" mo]
    return (a != "" && b != "" && b + 0 > 0) ? sprintf("%.2f", a / b) : "n/a" }
END {
    print "| job (median of 3 rounds) | nbd-client ioctl | nbd-daemon ioctl | nbd-daemon+relay ioctl | daemon/client ioctl | relay/daemon ioctl | nbd-client netlink | nbd-daemon netlink | nbd-daemon+relay netlink | daemon/client netlink | relay/daemon netlink |"
    print "|---|---|---|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= jobs; i++) { j = order[i]; line = "| " j
        for (k = 1; k <= 2; k++) { mo = (k == 1) ? "ioctl" : "netlink"
            line = line " | " cell(j, "nbd-client", mo) " | " cell(j, "nbd-daemon", mo) " | " cell(j, "nbd-daemon-relay", mo)
            line = line " | " ratio(j, "nbd-daemon", "nbd-client", mo) " | " ratio(j, "nbd-daemon-relay", "nbd-daemon", mo) }
        print line " |" }
}' "$work/serial.log"

# Helpers sourced by scenarios inside the VM: `. /usr/local/lib/nbdvm.sh` (busybox ash).
# Scenarios print machine-readable lines "RESULT <scenario> key=value ..."; the host-side tests decide.

result() { echo "RESULT $*"; }
note() { echo "NOTE $*"; }

# Milliseconds since boot (10 ms resolution), from /proc/uptime.
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# Device size in bytes (sysfs size is in 512-byte sectors whatever the logical block size).
nbd_bytes() { echo $(( $(cat "/sys/block/$1/size") * 512 )); }
nbd_lbs() { cat "/sys/block/$1/queue/logical_block_size"; }
# pid attribute is present only while a connection is configured.
nbd_pid() { cat "/sys/block/$1/pid" 2>/dev/null || true; }

# wait_connected DEV TIMEOUT_S [PID]: size > 0 and pid attribute present. Prints elapsed ms; returns 1 on
# timeout, or as soon as PID (the process expected to connect) has exited.
wait_connected() {
    local dev=$1 limit=$(( $2 * 1000 )) pid=${3:-} t0 t
    t0=$(now_ms)
    while :; do
        t=$(( $(now_ms) - t0 ))
        if [ "$(cat /sys/block/$dev/size)" != 0 ] && [ -e "/sys/block/$dev/pid" ]; then echo "$t"; return 0; fi
        [ "$t" -ge "$limit" ] && { echo "$t"; return 1; }
        [ -n "$pid" ] && proc_gone "$pid" && { echo "$t"; return 1; }
        sleep 0.05
    done
}

# wait_free DEV TIMEOUT_S: size 0 and no pid attribute. Prints elapsed ms; returns 1 on timeout.
wait_free() {
    local dev=$1 limit=$(( $2 * 1000 )) t0 t
    t0=$(now_ms)
    while :; do
        t=$(( $(now_ms) - t0 ))
        if [ "$(cat /sys/block/$dev/size)" = 0 ] && [ ! -e "/sys/block/$dev/pid" ]; then echo "$t"; return 0; fi
        [ "$t" -ge "$limit" ] && { echo "$t"; return 1; }
        sleep 0.05
    done
}

# wait_port PORT TIMEOUT_S: a TCP listener on 127.0.0.1:PORT (or any address) exists.
wait_port() {
    local port=$1 n=$(( $2 * 20 ))
    while [ "$n" -gt 0 ]; do
        netstat -ltn 2>/dev/null | grep -q "[:.]$port[[:space:]]" && return 0
        sleep 0.05; n=$(( n - 1 ))
    done
    return 1
}

# wait_path PATH TIMEOUT_S (unix sockets, pid files)
wait_path() {
    local n=$(( $2 * 20 ))
    while [ "$n" -gt 0 ]; do [ -e "$1" ] && return 0; sleep 0.05; n=$(( n - 1 )); done
    return 1
}

# start_nbd_server PORT then pairs NAME FILE [NAME FILE]... : one nbd-server (forks into background).
start_nbd_server() {
    local port=$1 conf=/tmp/nbd-server-$1.conf; shift
    printf '[generic]\n    listenaddr = 127.0.0.1\n    port = %s\n    allowlist = true\n    pidfile = /run/nbd-server-%s.pid\n' "$port" "$port" > "$conf"
    while [ $# -ge 2 ]; do
        printf '[%s]\n    exportname = %s\n' "$1" "$2" >> "$conf"
        shift 2
    done
    nbd-server -C "$conf" || return 1
    wait_port "$port" 10
}

# wait_handshake PORT: nbd-server sometimes leaves its first connections unanswered after it is listening (~18 s in two
# CI runs of daemon-map, `connect`'s 10 s handshake timeout in one of daemon-device; never seen with the scenario
# alone; not entropy: the kernel's CRNG is ready 0.08 s into boot). Scenarios that measure our client, not nbd-server's
# start, wait until it answers a handshake (`nbd-daemon list`, up to 7 tries); the wait is reported, not hidden.
wait_handshake() {
    local port=$1 t0 probes=0
    t0=$(now_ms)
    until nbd-daemon list "nbd://127.0.0.1:$port" >/tmp/list-probe-$port.out 2>&1; do
        probes=$((probes + 1)); sed "s/^/LOG list-probe-$port: /" /tmp/list-probe-$port.out
        [ "$probes" -ge 6 ] && break
    done
    note "nbd-server on $port answered a handshake $(( $(now_ms) - t0 )) ms after it listened ($probes failed probes)"
}

# sha256 of the first N bytes of FILE
sha_head() { head -c "$2" "$1" | sha256sum | cut -d' ' -f1; }
sha_file() { sha256sum "$1" | cut -d' ' -f1; }

# --- nbd-daemon helpers ---------------------------------------------------------------------------
# proc_gone PID: the process has exited (gone or zombie; a zombie still answers kill -0).
proc_gone() {
    [ -d "/proc/$1" ] || return 0
    grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# wait_exit PID TIMEOUT_S: waits for a background child of this shell (never call it in $(...): a subshell
# cannot `wait` for it). Sets EXIT_RC (exit code, or "timeout") and EXIT_MS; returns 1 on timeout.
wait_exit() {
    local pid=$1 limit=$(( $2 * 1000 )) t0
    t0=$(now_ms)
    while ! proc_gone "$pid"; do
        EXIT_MS=$(( $(now_ms) - t0 ))
        [ "$EXIT_MS" -ge "$limit" ] && { EXIT_RC=timeout; return 1; }
        sleep 0.05
    done
    EXIT_MS=$(( $(now_ms) - t0 ))
    wait "$pid"; EXIT_RC=$?
    return 0
}

# daemon_connect LOG ARGS... : `nbd-daemon connect ARGS` in the background; sets DPID.
daemon_connect() {
    local log=$1; shift
    echo "nbd-daemon connect $*" > "$log"
    nbd-daemon connect "$@" >>"$log" 2>&1 &
    DPID=$!
}

# daemon_kill PID [SIGNAL]: signal, wait at most 15 s (EXIT_RC, EXIT_MS), then SIGKILL so a hung daemon
# cannot stall the run.
daemon_kill() {
    kill "-${2:-TERM}" "$1" 2>/dev/null
    if ! wait_exit "$1" 15; then kill -KILL "$1" 2>/dev/null; wait "$1" 2>/dev/null; fi
}

# show_log LOG: the daemon's output, prefixed, for the host-side failure messages.
show_log() { sed "s/^/LOG $(basename "$1" .log): /" "$1" 2>/dev/null | head -n 40; }

# device_of_pid PID: the nbd device whose sysfs pid is one of PID's threads (the kernel records a thread id).
device_of_pid() {
    local d p
    for d in /sys/block/nbd*; do
        p=$(cat "$d/pid" 2>/dev/null) || continue
        if [ "$p" = "$1" ] || [ -d "/proc/$1/task/$p" ]; then basename "$d"; return 0; fi
    done
    return 1
}

# wait_device_of_pid PID TIMEOUT_S: waits until some nbd device is connected by PID; prints its name.
wait_device_of_pid() {
    local n=$(( $2 * 20 )) d
    while [ "$n" -gt 0 ]; do
        d=$(device_of_pid "$1") && [ "$(cat /sys/block/$d/size)" != 0 ] && { echo "$d"; return 0; }
        proc_gone "$1" && return 1
        sleep 0.05; n=$(( n - 1 ))
    done
    return 1
}

yesno() { if [ "$1" = 0 ]; then echo yes; else echo no; fi; }

# --- kernel modules and the silent loopback partition --------------------------------------------------------
# load_module NAME: insmod a module run-vm.sh copied with --module NAME, its dependencies first.
load_module() {
    local name=$1 dep
    [ -d "/sys/module/$name" ] && return 0
    [ -f "/lib/modules/extra/$name.ko" ] || { echo "load_module: $name.ko missing (run-vm.sh --module $name)" >&2; return 1; }
    for dep in $(cat "/lib/modules/extra/$name.dep"); do load_module "$dep" || return 1; done
    insmod "/lib/modules/extra/$name.ko"
}

# lo_partition / lo_heal: every packet leaving lo (so every loopback packet) is dropped in silence, and back.
# netem drops at enqueue and reports success, so TCP sees neither an error nor a RST: a peer that went away
# without a word. Needs `--module sch_netem --bin tc` (iproute2's tc: busybox's applet has no netem).
LO_TC=/usr/sbin/tc
lo_partition() { "$LO_TC" qdisc replace dev lo root netem loss 100%; }
lo_heal() { "$LO_TC" qdisc del dev lo root; }
lo_qdisc() { "$LO_TC" qdisc show dev lo | head -n 1; }

# tcp_answers PORT SECONDS: yes when a TCP server on 127.0.0.1:PORT sends its first bytes within SECONDS
# (an NBD server greets at once with NBDMAGIC), no otherwise.
tcp_answers() {
    local f=/tmp/tcp-answers.$$
    timeout "$2" nc 127.0.0.1 "$1" </dev/null >"$f" 2>/dev/null
    if [ -s "$f" ]; then echo yes; else echo no; fi
    rm -f "$f"
}

# --- reading nbd-verify's --status and --events files (tests/vm/tools/nbd-verify.c) ------------------------------
# status_val STATUS KEY: KEY's value in the status file
status_val() { sed 's/^/ /' "$1" 2>/dev/null | sed -n "s/.* $2=\([^ ]*\).*/\1/p" | head -n1; }

# wait_served STATUS T TIMEOUT_S: the verifier completed an I/O after T. Sets SERVED (yes/no), SERVED_MS.
wait_served() {
    local st=$1 t=$2 limit=$3 now lo
    SERVED=no
    while :; do
        now=$(nbd-verify now)
        lo=$(status_val "$st" last_ok)
        if [ -n "$lo" ] && awk -v a="$lo" -v b="$t" 'BEGIN { exit !(a > b) }'; then
            SERVED=yes; SERVED_MS=$(awk -v a="$lo" -v b="$t" 'BEGIN { printf "%d", (a - b) * 1000 }'); return 0
        fi
        if awk -v a="$now" -v b="$t" -v l="$limit" 'BEGIN { exit !(a - b > l) }'; then
            SERVED_MS=-1; return 1
        fi
        sleep 0.1
    done
}

# stall_after EVENTS T END: ms of the longest gap ending after T and starting before END, from max(start, T).
stall_after() {
    awk -v T="$2" -v E="$3" '$1 == "gap" {
        s = substr($2, 7); e = substr($3, 5)
        if (e + 0 > T + 0 && s + 0 < E + 0) { v = (e - (s > T ? s : T)) * 1000; if (v > m) m = v }
    } END { printf "%d\n", m }' "$1"
}

# count_between EVENTS KIND T0 T1: events of KIND (error, verify_fail) whose t= lies in [T0, T1)
count_between() {
    awk -v k="$2" -v a="$3" -v b="$4" '$1 == k { t = ""; for (i = 2; i <= NF; i++) if (substr($i, 1, 2) == "t=") { t = substr($i, 3) }
        if (t != "" && t + 0 >= a + 0 && t + 0 < b + 0) n++ } END { printf "%d\n", n }' "$1"
}

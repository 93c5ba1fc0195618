#!/bin/bash
# Full-tier scenario: the daemon restarted under a mounted ext4, run inside the VM by vm-scenario.service.
# Prints "RESULT systemd <key>=<value>" lines (all prefixed rs_); tests/Vm.Tests/Systemd/DaemonRestartTests.cs
# asserts. Every step is bounded by `timeout`.
#
# One netlink mapping "fs" (OnStop=Leave, Timeout 5 s, Reconnect 0.25 s .. 1 s, DeadConnectionTimeout left at the
# daemon's default) to nbdkit (file plugin, foreground, one process) on 127.0.0.1:10809; ext4 on /dev/nbd0,
# mounted; a writer creates files of random sizes (4 KiB .. 2 MiB) with their sha256 in a manifest and runs
# `sync -f` every 4 files. A monitor samples the device's sysfs size / pid / backend (every 0.1 s nominally, ~1 s under a
# loaded TCG host). Steps:
#   rs_restart_*  `systemctl restart nbd-daemon`: a new process re-adopts the device it left connected
#   rs_kill_*     `systemctl kill -s KILL nbd-daemon`: the unit's Restart=on-failure brings it back (RestartSec)
#   rs_server_*   nbdkit SIGKILLed and restarted 2 s later: the adopted mapping reconnects
#   rs_writer_*, rs_device_*, rs_fsck_rc, rs_check_*   the writer's errors, the monitor's findings, e2fsck -fn,
#                 sha256sum -c of the manifest after a read-only remount
#   rs_stop_*     unmounted, configuration without OnStop (default Disconnect), restart (adopts), `systemctl stop`:
#                 the device is freed
#   rs_relay_*    the same mapping with Relay: true, Connections: 2, OnStop=Leave and Timeout 30 s, ext4 mounted again
#                 with a writer: each relay keeps its journal and both ends of its kernel connection in systemd's file
#                 descriptor store (3 descriptors each); two `systemctl restart`s, each relay stopping between two
#                 requests and the next process resuming on both groups; then three SIGKILLs under the writer, each the moment
#                 a block request is in flight
#                 (rs_relay_kill_*: the next process takes both groups and recovers from the journals: no new
#                 connection, a stall of the restart); the writer, kernel log, e2fsck and checksums
#   rs_relay_down_*  nbdkit SIGKILLed between the stopping and the new process of a `systemctl restart`, back once the
#                 new process was refused: the handed-over ends are kept until the mapping serves again, and resumed
#   rs_relay_partial_*  likewise, but nbdkit back taking one connection at a time for a while: each attempt takes an
#                 end with its first connection and is refused the second; the end goes back to the store, and both resume
set -u
r() { echo "RESULT systemd rs_$1=$2"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
prop() { systemctl show -p "$2" --value "$1" 2>/dev/null; }
wait_port() { # PORT: until something listens on 127.0.0.1:PORT (10 s)
    local i
    for i in $(seq 1 100); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.1; done
    return 1
}
dev_size() { cat /sys/block/nbd0/size 2>/dev/null || echo missing; }
dev_pid() { [ -e /sys/block/nbd0/pid ] && echo present || echo absent; }
dev_backend() { local b; b=$(cat /sys/block/nbd0/backend 2>/dev/null); echo "${b:-none}"; }
# wait_active TIMEOUT_S OLD_PID: the unit is active with a MainPID other than OLD_PID; prints elapsed ms
wait_active() {
    local limit=$(( $1 * 1000 )) old=$2 t0 pid
    t0=$(now_ms)
    while :; do
        pid=$(prop nbd-daemon MainPID)
        if [ "$(prop nbd-daemon ActiveState)" = active ] && [ "${pid:-0}" -gt 0 ] && [ "$pid" != "$old" ]; then
            echo $(( $(now_ms) - t0 )); return 0
        fi
        [ $(( $(now_ms) - t0 )) -ge "$limit" ] && { echo $(( $(now_ms) - t0 )); return 1; }
        sleep 0.1
    done
}
# ready_ms: how long the current process took from exec to READY=1 (the unit's own timestamps)
ready_ms() {
    local e a
    e=$(prop nbd-daemon ExecMainStartTimestampMonotonic); a=$(prop nbd-daemon ActiveEnterTimestampMonotonic)
    if [ "${e:-0}" -gt 0 ] && [ "${a:-0}" -ge "$e" ]; then echo $(( (a - e) / 1000 )); else echo none; fi
}
# inflight_wait: until the block layer has a request of nbd0 in flight (10 s at most); prints the count it saw (0: none)
inflight_wait() {
    local i n
    for i in $(seq 1 200); do
        n=$(awk '{ print $1 + $2 }' /sys/block/nbd0/inflight 2>/dev/null)
        [ "${n:-0}" -gt 0 ] && { echo "$n"; return 0; }
        sleep 0.05
    done
    echo 0
}
# sigkill PREFIX OLD_PID [inflight]: `systemctl kill -s KILL`, then wait for Restart= to bring a new process up; reports
# PREFIX_rc, _restarted, _back_ms, _ready_ms, _NRestarts_delta and sets NEW_PID and KILL_MS (when the signal went).
# With "inflight": first waits for a request of nbd0 in flight (PREFIX_inflight), then sends SIGKILL to OLD_PID itself
# (the same death for systemd; `systemctl kill` takes a few hundred ms under TCG, long enough for the burst to end)
sigkill() {
    local nr0 back_ms
    nr0=$(prop nbd-daemon NRestarts)
    if [ "${3:-}" = inflight ]; then
        r "$1_inflight" "$(inflight_wait)"
        KILL_MS=$(now_ms)
        kill -KILL "$2"; r "$1_rc" "$?"
    else
        KILL_MS=$(now_ms)
        timeout 10 systemctl kill -s KILL nbd-daemon.service; r "$1_rc" "$?"
    fi
    back_ms=$(wait_active 180 "$2"); r "$1_restarted" "$([ $? = 0 ] && echo yes || echo no)"
    r "$1_back_ms" "$back_ms"
    r "$1_ready_ms" "$(ready_ms)"
    NEW_PID=$(prop nbd-daemon MainPID)
    r "$1_NRestarts_delta" "$(( $(prop nbd-daemon NRestarts) - nr0 ))"
}
# adopted PID: journal entries of the mapping, logged by process PID, that mention adoption
adopted() {
    journalctl --sync 2>/dev/null
    journalctl --no-pager -o cat -u nbd-daemon MAPPING=fs "_PID=$1" 2>/dev/null | grep -ci 'adopt'
}
# O_DIRECT read of the raw device (fine under a mounted filesystem): prints ms until it returned; rc of dd
probe() {
    local t0 rc
    t0=$(now_ms)
    timeout 150 dd if=/dev/nbd0 of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null; rc=$?
    echo "$(( $(now_ms) - t0 )) $rc"
}

IMG=/var/tmp/fs.img MNT=/mnt/fs W=/tmp/writer CONF=/etc/nbd-daemon/appsettings.json
r boot_uptime_s "$(cut -d' ' -f1 /proc/uptime)"
r kernel "$(uname -r)"
for t in nbdkit mkfs.ext4 e2fsck sha256sum; do r "tool_${t//./_}" "$(command -v "$t" >/dev/null && echo yes || echo no)"; done
if ! systemctl cat nbd-daemon.service >/dev/null 2>&1; then
    r daemon_installed no
    exit 0
fi
r daemon_installed yes
r unit_Restart "$(prop nbd-daemon Restart)"
r unit_RestartUSec "$(prop nbd-daemon RestartUSec)"
r unit_StartLimitIntervalUSec "$(prop nbd-daemon StartLimitIntervalUSec)"
timeout 30 systemctl stop nbd-daemon.service 2>/dev/null

mkdir -p "$MNT" /etc/nbd-daemon
truncate -s 512M "$IMG"
start_kit() {
    nbdkit -f --ipaddr 127.0.0.1 --port 10809 file "$IMG" >>/tmp/nbdkit.log 2>&1 &
    KIT=$!
    wait_port 10809
}
start_kit && r server up || { r server down; cat /tmp/nbdkit.log; }

write_config() { # ONSTOP (Leave, or "" for the default) [relay]
    local onstop="" timeout="00:00:05"
    [ -n "$1" ] && onstop=", \"OnStop\": \"$1\""
    # A relay's journal carries the kernel's connection across a crash only if its requests outlast the restart
    # (RestartSec=1 plus the start, seconds under TCG): the driver's timeout handler would end the connection first.
    [ "${2:-}" = relay ] && onstop="$onstop, \"Relay\": true, \"Connections\": 2" && timeout="00:00:30"
    cat >"$CONF" <<EOF
{ "Nbd": { "Mappings": [
  { "Name": "fs", "Uri": "nbd://127.0.0.1:10809/fs", "Device": "/dev/nbd0", "Interface": "Netlink",
    "Timeout": "$timeout", "Reconnect": { "InitialDelay": "00:00:00.250", "MaxDelay": "00:00:01" }$onstop }
] } }
EOF
}
write_config Leave
systemctl reset-failed nbd-daemon.service 2>/dev/null
timeout 60 systemctl start nbd-daemon.service; r start_rc "$?"
r start_ready_ms "$(ready_ms)"
PID0=$(prop nbd-daemon MainPID)
r start_size "$(dev_size)"
r start_backend "$(dev_backend)"
SIZE0=$(dev_size) BACKEND0=$(dev_backend)
dmesg -C
timeout 120 mkfs.ext4 -F -q /dev/nbd0; r mkfs_rc "$?"
mount -t ext4 -o errors=remount-ro /dev/nbd0 "$MNT"; MOUNT_RC=$?
r mount_rc "$MOUNT_RC"
[ "$MOUNT_RC" = 0 ] || { journalctl --no-pager -u nbd-daemon | tail -n 30; exit 0; }

# op START_MS END_MS RC KIND N BYTES -> one line in $W.ops; $W.cur holds the start of the operation in progress (an
# operation still blocked shows nowhere else)
writer() {
    local n=0 size sum t0 rc old
    : >$W.ops; : >$W.manifest; : >$W.err
    while [ ! -e $W.stop ]; do
        n=$((n + 1))
        size=$(( 4096 + (RANDOM * 32768 + RANDOM) % (2 * 1048576 - 4096 + 1) ))
        head -c $size /dev/urandom >$W.dat
        sum=$(sha256sum $W.dat | cut -d' ' -f1)
        t0=$(now_ms); echo "$t0" >$W.cur; cat $W.dat >"$MNT/f$n" 2>>$W.err; rc=$?
        echo "$t0 $(now_ms) $rc write $n $size" >>$W.ops; : >$W.cur
        [ $rc = 0 ] && echo "$sum  f$n" >>$W.manifest
        if [ $((n % 4)) = 0 ]; then
            t0=$(now_ms); echo "$t0" >$W.cur; sync -f "$MNT/f$n" 2>>$W.err; rc=$?
            echo "$t0 $(now_ms) $rc sync $n 0" >>$W.ops; : >$W.cur
        fi
        old=$((n - 120))
        if [ $old -ge 1 ]; then
            t0=$(now_ms); echo "$t0" >$W.cur; rm "$MNT/f$old" 2>>$W.err; rc=$?
            echo "$t0 $(now_ms) $rc rm $old 0" >>$W.ops; : >$W.cur
            [ $rc = 0 ] && sed -i "/  f$old\$/d" $W.manifest
        fi
    done
    t0=$(now_ms); echo "$t0" >$W.cur; sync -f "$MNT" 2>>$W.err; rc=$?
    echo "$t0 $(now_ms) $rc sync final 0" >>$W.ops; : >$W.cur
    rm -f $W.cur
}
# monitor: one line "size pid backend" per 0.1 s until $W.stopmon exists. A disconnect alone does not show here:
# while the filesystem holds the device open the kernel keeps size, pid and backend (seen with a daemon that
# disconnected on stop), so the writer, the probes and e2fsck are what prove the connection was kept; this proves
# the configuration was never torn down and replaced.
monitor() {
    : >/tmp/monitor
    while [ ! -e $W.stopmon ]; do echo "$(dev_size) $(dev_pid) $(dev_backend)" >>/tmp/monitor; sleep 0.1; done
}
# stall FROM_MS TO_MS: the longest writer operation overlapping the window
stall() { awk -v a="$1" -v b="$2" '$2 >= a && $1 <= b && $2 - $1 > m { m = $2 - $1 } END { print m + 0 }' $W.ops; }

rm -f $W.stop $W.stopmon
writer &
WPID=$!
monitor &
MPID=$!
sleep 5

# (1) systemctl restart. Under TCG on a loaded host a .NET start can outlast the image's DefaultTimeoutStartSec
# (60 s): systemd then stops the half-started daemon (OnStop=Leave: device left) and Restart= tries again, so the
# step waits for the unit to be active with a new process rather than trusting the first start.
NR0=$(prop nbd-daemon NRestarts)
t0=$(now_ms)
timeout 90 systemctl restart nbd-daemon.service; r restart_rc "$?"
wait_active 180 "$PID0" >/dev/null; r restart_active "$([ $? = 0 ] && echo yes || echo no)"
r restart_ms "$(( $(now_ms) - t0 ))"
r restart_NRestarts_delta "$(( $(prop nbd-daemon NRestarts) - NR0 ))"
r restart_ready_ms "$(ready_ms)"
PID1=$(prop nbd-daemon MainPID)
sleep 3
r restart_adopted "$(adopted "$PID1")"
read -r ms rc < <(probe); r restart_probe_rc "$rc"; r restart_probe_ms "$ms"
r restart_stall_ms "$(stall "$t0" "$(now_ms)")"
sleep 3

# (2) systemctl kill -s KILL: Restart= brings the unit back
t0=$(now_ms)
sigkill kill "$PID1"
PID2=$NEW_PID
sleep 3
r kill_adopted "$(adopted "$PID2")"
read -r ms rc < <(probe); r kill_probe_rc "$rc"; r kill_probe_ms "$ms"
r kill_stall_ms "$(stall "$t0" "$(now_ms)")"
sleep 3

# (3) the adopted mapping reconnects after a server outage
t0=$(now_ms)
kill -KILL "$KIT"; wait "$KIT" 2>/dev/null
sleep 2
start_kit || r server_restart failed
t_up=$(now_ms)
read -r ms rc < <(probe); r server_probe_rc "$rc"; r server_io_after_up_ms "$ms"
r server_stall_ms "$(stall "$t0" "$(now_ms)")"
r server_same_pid "$([ "$(prop nbd-daemon MainPID)" = "$PID2" ] && echo yes || echo no)"
journalctl --sync 2>/dev/null
r server_reconnecting "$(journalctl --no-pager -o cat -u nbd-daemon MAPPING=fs "_PID=$PID2" | grep -c -- '-> Reconnecting')"
sleep 3

touch $W.stop; wait "$WPID"
touch $W.stopmon; wait "$MPID"
r writer_ops "$(wc -l <$W.ops)"
r writer_errors "$(awk '$3 != 0' $W.ops | wc -l)"
r writer_max_stall_ms "$(awk '$2 - $1 > m { m = $2 - $1 } END { print m + 0 }' $W.ops)"
head -n 20 $W.err | sed 's/^/writer: /'
r device_samples "$(wc -l </tmp/monitor)"
r device_size_changed "$(awk -v s="$SIZE0" '$1 != s' /tmp/monitor | wc -l)"
r device_pid_absent "$(awk '$2 != "present"' /tmp/monitor | wc -l)"
r device_backend_changed "$(awk -v b="$BACKEND0" '$3 != b' /tmp/monitor | wc -l)"

umount "$MNT"; r umount_rc "$?"
timeout 300 e2fsck -fn /dev/nbd0 >/tmp/fsck.out 2>&1; r fsck_rc "$?"
sed 's/^/e2fsck: /' /tmp/fsck.out | tail -n 10
mount -t ext4 -o ro /dev/nbd0 "$MNT"; r remount_rc "$?"
r check_files "$(wc -l <$W.manifest)"
r check_files_on_fs "$(ls "$MNT" | grep -c '^f[0-9]*$')"
(cd "$MNT" && sha256sum -c $W.manifest) >/tmp/check.out 2>&1
r check_mismatches "$(grep -vc ': OK$' /tmp/check.out)"
umount "$MNT"
dmesg >/tmp/kmsg
r kernel_io_errors "$(grep -c 'I/O error' /tmp/kmsg)"
r kernel_ext4_errors "$(grep -c 'EXT4-fs error\|EXT4-fs warning\|Aborting journal\|Remounting filesystem read-only\|JBD2: .*[Ee]rror' /tmp/kmsg)"
grep 'nbd0\|EXT4\|JBD2\|I/O error' /tmp/kmsg | head -n 40 | sed 's/^/kernel: /'

# (4) default OnStop (Disconnect): restart once more to load it (the running process still has Leave), then stop
write_config ""
timeout 90 systemctl restart nbd-daemon.service; r stop_restart_rc "$?"
wait_active 180 "$PID2" >/dev/null; r stop_restart_active "$([ $? = 0 ] && echo yes || echo no)"
PID4=$(prop nbd-daemon MainPID)
r stop_adopted "$(adopted "$PID4")"
r stop_before_size "$(dev_size)"
t0=$(now_ms)
timeout 60 systemctl stop nbd-daemon.service; r stop_rc "$?"
r stop_ms "$(( $(now_ms) - t0 ))"
r stop_ActiveState "$(prop nbd-daemon ActiveState)"
r stop_Result "$(prop nbd-daemon Result)"
sleep 1
r stop_size "$(dev_size)"
r stop_pid "$(dev_pid)"

# (5) Relay: true, OnStop=Leave: the kernel's connection is one end of a socket pair, the relay in the daemon.
# jcount PID TEXT: journal entries of the mapping logged by process PID that contain TEXT
jcount() {
    journalctl --sync 2>/dev/null
    journalctl --no-pager -o cat -u nbd-daemon MAPPING=fs "_PID=$1" 2>/dev/null | grep -c -- "$2"
}
write_config Leave relay
timeout 90 systemctl start nbd-daemon.service; r relay_start_rc "$?"
wait_active 180 "$PID4" >/dev/null; r relay_start_active "$([ $? = 0 ] && echo yes || echo no)"
PREV=$(prop nbd-daemon MainPID)
r relay_start_connected "$(jcount "$PREV" 'NBD_CMD_CONNECT')"
mount -t ext4 -o errors=remount-ro /dev/nbd0 "$MNT"; r relay_mount_rc "$?"
dmesg -C
rm -f $W.stop
writer &
WPID=$!
sleep 5
for i in 1 2; do
    t0=$(now_ms)
    timeout 90 systemctl restart nbd-daemon.service; r "relay_restart${i}_rc" "$?"
    wait_active 180 "$PREV" >/dev/null; r "relay_restart${i}_active" "$([ $? = 0 ] && echo yes || echo no)"
    r "relay_restart${i}_ms" "$(( $(now_ms) - t0 ))"
    r "relay_restart${i}_ready_ms" "$(ready_ms)"
    NEXT=$(prop nbd-daemon MainPID)
    read -r ms rc < <(probe); r "relay_restart${i}_probe_rc" "$rc"
    r "relay_restart${i}_stall_ms" "$(stall "$t0" "$(now_ms)")"
    r "relay_restart${i}_handed_over" "$(jcount "$PREV" "its journal nbd-journal/fs/[0-9a-f]* stays in systemd's file descriptor store")"
    r "relay_restart${i}_resumed" "$(jcount "$NEXT" 'relay resumed on the kernel')"
    r "relay_restart${i}_carried_on" "$(jcount "$NEXT" 'carrying on with 2 relay connections')"
    r "relay_restart${i}_reconfigure" "$(jcount "$NEXT" 'NBD_CMD_RECONFIGURE')"
    r "relay_restart${i}_reconnecting" "$(jcount "$NEXT" '-> Reconnecting')"
    r "relay_restart${i}_fdstore_after" "$(prop nbd-daemon NFileDescriptorStore)"
    PREV=$NEXT
    sleep 3
done
# The kernel log of the two restarts alone (the SIGKILL below has its own).
dmesg >/tmp/kmsg-relay
r relay_kernel_nbd_lines "$(grep -c 'nbd0' /tmp/kmsg-relay)"
r relay_kernel_io_errors "$(grep -c 'I/O error' /tmp/kmsg-relay)"
grep 'nbd0\|EXT4\|I/O error' /tmp/kmsg-relay | head -n 20 | sed 's/^/kernel: /'
dmesg -C

# (5a) the server down across `systemctl restart`: the stopping process hands both relay ends over (nbdkit still up, so
# every reply is in), nbdkit is SIGKILLed as soon as that process is gone, so the new process's first attempts are
# refused while the writer's requests queue in the handed-over ends; nbdkit comes back once the new process has logged
# a refusal. The new process must keep the ends until its mapping serves, and resume on them: closing them would leave
# the requests queued in them waiting for the hand-over's 60 s request timeout.
# stall_after FROM_MS: the longest part after FROM_MS of a writer operation still running at FROM_MS or started after,
# the one in progress now included (a request stuck until its timeout would otherwise show only once it ended)
stall_after() {
    local cur=""
    [ -s $W.cur ] && cur=$(cat $W.cur 2>/dev/null)
    awk -v a="$1" -v now="$(now_ms)" -v cur="$cur" '
        $2 >= a { s = ($1 > a ? $1 : a); if ($2 - s > m) m = $2 - s }
        END { if (cur != "") { s = (cur + 0 > a ? cur + 0 : a); if (now - s > m) m = now - s }; print m + 0 }' $W.ops
}
# restart_server_gone P: `systemctl restart`, and nbdkit SIGKILLed as soon as the stopping process is gone (it handed its
# ends over with nbdkit still up, so every reply was in); sets T0
restart_server_gone() {
    timeout 30 systemctl restart --no-block nbd-daemon.service; r "$1_restart_rc" "$?"
    T0=$(now_ms)
    while kill -0 "$PREV" 2>/dev/null && [ $(( $(now_ms) - T0 )) -lt 90000 ]; do sleep 0.05; done
    kill -KILL "$KIT" 2>/dev/null; wait "$KIT" 2>/dev/null
}
# logged_by_next PATTERN N: waits (from T0, 180 s at most) until the new process has logged PATTERN N times; sets NEXT
# and COUNT (not in a subshell: the caller needs NEXT)
logged_by_next() {
    local pid n=0
    NEXT="" COUNT=0
    while [ $(( $(now_ms) - T0 )) -lt 180000 ]; do
        pid=$(prop nbd-daemon MainPID)
        if [ "${pid:-0}" -gt 0 ] && [ "$pid" != "$PREV" ]; then
            NEXT=$pid
            n=$(jcount "$NEXT" "$1")
            [ "$n" -ge "$2" ] && break
        fi
        sleep 0.2
    done
    COUNT=$n
}
# server_back P LABEL: nbdkit started again (plain), then what the new process made of the handed-over ends: probe,
# writer stall after nbdkit was back, ends handed over and resumed, the store afterwards, the kernel log; PREV=NEXT
server_back() {
    local t_back ms rc
    t_back=$(now_ms)
    start_kit; r "$1_server_back" "$([ $? = 0 ] && echo yes || echo no)"
    wait_active 180 "$PREV" >/dev/null; r "$1_active" "$([ $? = 0 ] && echo yes || echo no)"
    NEXT=$(prop nbd-daemon MainPID)
    read -r ms rc < <(probe); r "$1_probe_rc" "$rc"
    sleep 2
    r "$1_stall_after_back_ms" "$(stall_after "$t_back")"
    r "$1_handed_over" "$(jcount "$PREV" "its journal nbd-journal/fs/[0-9a-f]* stays in systemd's file descriptor store")"
    r "$1_resumed" "$(jcount "$NEXT" 'relay resumed on the kernel')"
    # The store logs without a MAPPING field: every entry of the process.
    r "$1_unclaimed" "$(journalctl --no-pager -o cat -u nbd-daemon "_PID=$NEXT" 2>/dev/null | grep -c 'claimed by no mapping')"
    r "$1_fdstore_after" "$(prop nbd-daemon NFileDescriptorStore)"
    PREV=$NEXT
    dmesg >"/tmp/kmsg-$1"
    r "$1_kernel_nbd_lines" "$(grep -c 'nbd0' "/tmp/kmsg-$1")"
    r "$1_kernel_io_errors" "$(grep -c 'I/O error' "/tmp/kmsg-$1")"
    grep 'nbd0\|EXT4\|I/O error' "/tmp/kmsg-$1" | head -n 20 | sed "s/^/kernel ($2): /"
    dmesg -C
}
sleep 3
restart_server_gone relay_down
r relay_down_server_killed_after_ms "$(( $(now_ms) - T0 ))"
logged_by_next 'connection refused' 1; r relay_down_refused "$COUNT"
server_back relay_down "server down across restart"
sleep 3

# (5c) the server back across `systemctl restart`, but taking one connection at a time (nbdkit's limit filter) for a
# while: each attempt of the new process takes a handed-over end with its first connection and is refused its second.
# The end taken must go back to the store untouched, not be closed (which ends one of the kernel's two connections);
# once nbdkit takes both connections again, both ends resume.
restart_server_gone relay_partial
nbdkit -f --ipaddr 127.0.0.1 --port 10809 --filter=limit file "$IMG" limit=1 >>/tmp/nbdkit.log 2>&1 &
KIT=$!
wait_port 10809; r relay_partial_limited_server "$([ $? = 0 ] && echo up || echo down)"
logged_by_next '-> Reconnecting' 2; r relay_partial_failed_attempts "$COUNT"
r relay_partial_given_back "$(jcount "$NEXT" 'given back untouched')"
kill -KILL "$KIT" 2>/dev/null; wait "$KIT" 2>/dev/null
server_back relay_partial "server one connection at a time"
sleep 3

# (5b) the relay mapping SIGKILLed under the writer: each relay's journal is in systemd's file descriptor store with both
# ends of its kernel connection all along, so the connections live on; Restart= brings the daemon back after RestartSec,
# it takes both groups, adopts the device with them (no RECONFIGURE) and resumes: it finishes a reply the kill cut off and
# resends the requests not answered. The writer's stall is the restart (without the journal: the restart plus the rest of
# Timeout, 30 s here). Three kills, each the moment the block layer has a request of nbd0 in flight (10 s at most).
for k in 1 2 3; do
    sigkill "relay_kill$k" "$PREV" inflight
    NEXT=$NEW_PID
    read -r ms rc < <(probe); r "relay_kill${k}_probe_rc" "$rc"; r "relay_kill${k}_probe_ms" "$ms"
    sleep 2
    r "relay_kill${k}_stall_ms" "$(stall_after "$KILL_MS")"
    r "relay_kill${k}_resumed" "$(jcount "$NEXT" 'relay resumed on the kernel')"
    r "relay_kill${k}_resent" "$(journalctl --no-pager -o cat -u nbd-daemon MAPPING=fs "_PID=$NEXT" 2>/dev/null | grep 'from its journal' | sed -n 's/.*store: \([0-9]*\) requests it had not answered resent.*/\1/p' | awk '{ s += $1 } END { print s + 0 }')"
    r "relay_kill${k}_finished" "$(journalctl --no-pager -o cat -u nbd-daemon MAPPING=fs "_PID=$NEXT" 2>/dev/null | grep 'from its journal' | sed -n 's/.* \([0-9]*\) bytes of a reply it had cut off finished.*/\1/p' | awk '{ s += $1 } END { print s + 0 }')"
    r "relay_kill${k}_refused" "$(jcount "$NEXT" 'left by the previous process refused')"
    r "relay_kill${k}_reconfigure" "$(jcount "$NEXT" 'NBD_CMD_RECONFIGURE')"
    r "relay_kill${k}_fdstore_after" "$(prop nbd-daemon NFileDescriptorStore)"
    PREV=$NEXT
    sleep 1
done
touch $W.stop; wait "$WPID"
r relay_writer_ops "$(wc -l <$W.ops)"
r relay_writer_errors "$(awk '$3 != 0' $W.ops | wc -l)"
r relay_writer_max_stall_ms "$(awk '$2 - $1 > m { m = $2 - $1 } END { print m + 0 }' $W.ops)"
head -n 20 $W.err | sed 's/^/relay writer: /'
dmesg >/tmp/kmsg-relay-kill
r relay_kill_kernel_nbd_lines "$(grep -c 'nbd0' /tmp/kmsg-relay-kill)"
r relay_kill_kernel_io_errors "$(grep -c 'I/O error' /tmp/kmsg-relay-kill)"
grep 'nbd0\|EXT4\|I/O error' /tmp/kmsg-relay-kill | head -n 20 | sed 's/^/kernel (relay kill): /'
umount "$MNT"; r relay_umount_rc "$?"
timeout 300 e2fsck -fn /dev/nbd0 >/tmp/fsck-relay.out 2>&1; r relay_fsck_rc "$?"
sed 's/^/e2fsck: /' /tmp/fsck-relay.out | tail -n 10
mount -t ext4 -o ro /dev/nbd0 "$MNT"; r relay_remount_rc "$?"
(cd "$MNT" && sha256sum -c $W.manifest) >/tmp/check-relay.out 2>&1
r relay_check_files "$(wc -l <$W.manifest)"
r relay_check_mismatches "$(grep -vc ': OK$' /tmp/check-relay.out)"
umount "$MNT"

journalctl --sync 2>/dev/null
journalctl --no-pager -o short-monotonic -u nbd-daemon | tail -n 60 | sed 's/^/journal: /'
r journal_fs_entries "$(journalctl --no-pager -o json -u nbd-daemon MAPPING=fs | grep -c '"MAPPING":"fs"')"
kill -KILL "$KIT" 2>/dev/null
r end_of_scenario 1

# Server restarts under load on a netlink mapping with Connections=2 (the kernel runs two sockets per device and
# sends one LINK_DEAD per slot). One single-process nbdkit (`nbdkit -f`, file plugin: it advertises
# NBD_FLAG_CAN_MULTI_CONN, and its data survives SIGKILL), one daemon, one mapping on nbd0: Timeout 5 s,
# DeadConnectionTimeout 60 s, Reconnect 0.25 s .. 1 s. nbd-verify writes and verifies (O_DIRECT 4 KiB over 32 MiB)
# the whole time while nbdkit is SIGKILLed and restarted after 1..3 s, MULTICONN_ROUNDS times (default 3 = CI).
# Another count: NBD_VM_MULTICONN_ROUNDS=10 for tests/Vm.Tests (MultiConnTests), or by hand
#   (echo MULTICONN_ROUNDS=10; cat tests/vm/scenarios/multiconn.sh) > /tmp/multiconn-10.sh
#   tests/vm/run-vm.sh --script /tmp/multiconn-10.sh --daemon PUBLISH_DIR --bin nbdkit \
#       --add TOOLS/nbd-verify:/usr/local/bin/nbd-verify
# (the VM has no environment to pass the count through).
#
# What a round looks at is the slice of the daemon's log written from the kill to the round's end (served again
# after the server is back, then SETTLE_S more seconds for a late LINK_DEAD to show its effect):
#   reconnect_cycles   "Serving -> Reconnecting" transitions (one per restart is the goal; a second one is the
#                      needless cycle a LINK_DEAD for an already-replaced connection would cause)
#   cycles_after_handover  of those, the ones after the round's first successful hand-over
#   handovers / took   "kernel took N of M sockets" lines and their N/M (comma-separated, in order)
#   link_dead          transitions whose reason starts "connection lost (LINK_DEAD" (the event came first)
#   socket_ended       transitions whose reason names a socket's end, "connection lost ([LINK_DEAD; ]socket N of M:
#                      the server closed the connection|connection closed or shut down|connection error)" (the
#                      daemon's own watch of the handed-over sockets, since the KeepAlive change)
#   stale_ignored      event 108 lines "LINK_DEAD for an earlier connection ignored"
#   kernel_dead_slots  the driver's "Receive control failed" (etc.) lines for nbd0: one per slot it marked dead,
#                      each of which sends a LINK_DEAD
#   established        client-side TCP connections to the server's port at the round's end (netstat)
# The kernel has no per-connection view in sysfs (debugfs nbd/nbdX shows tasks/timeout/flags only, probed once).
#
# RESULT multiconn-tools ...; RESULT multiconn-start ...; RESULT multiconn-round round=N ... (one per round);
# RESULT multiconn-adopt ... and RESULT multiconn-adopted-round ... (the daemon SIGKILLed and started again, then one
# more server restart handled by the new process); RESULT multiconn ... (the whole run: verifier report, kernel
# errors); RESULT multiconn-stop exit_rc=N.
. /usr/local/lib/nbdvm.sh
R=${MULTICONN_ROUNDS:-3}
CONNECTIONS=2
PORT=10830
IMG=/tmp/multiconn.img
SIZE_MIB=64 REGION_MIB=32
TIMEOUT_S=5
SETTLE_S=3
DLOG=/tmp/daemon.log
EV=/tmp/mc-events ST=/tmp/mc-status STOP=/tmp/mc-stop

have() { command -v "$1" >/dev/null && echo yes || echo no; }
result multiconn-tools nbdkit=$(have nbdkit) daemon=$(have nbd-daemon) nbd_verify=$(have nbd-verify) rounds=$R

truncate -s ${SIZE_MIB}M $IMG
start_kit() { nbdkit -f -i 127.0.0.1 -p $PORT file $IMG >>/tmp/kit.log 2>&1 & KIT=$!; }
start_kit
wait_port $PORT 20 || note "nbdkit did not start"

mkdir -p /etc/nbd-daemon
cat > /etc/nbd-daemon/appsettings.json <<EOF
{ "Nbd": { "Mappings": [
  { "Name": "mc", "Uri": "nbd://127.0.0.1:$PORT/", "Device": "/dev/nbd0", "Interface": "Netlink",
    "Connections": $CONNECTIONS, "Timeout": "00:00:0$TIMEOUT_S", "DeadConnectionTimeout": "00:01:00", "OnStop": "Leave",
    "Reconnect": { "InitialDelay": "00:00:00.250", "MaxDelay": "00:00:01" } }
] } }
EOF
nbd-daemon >>$DLOG 2>&1 &
DAEMON=$!

kio_count() { dmesg | grep -c 'I/O error'; }
knbd_count() { dmesg | grep -c 'nbd0'; }
# the driver's messages when it marks one socket (slot) dead, each followed by one LINK_DEAD
SLOT_DEATH='Receive control failed\|Receive data failed\|Send control failed\|Request send failed\|Send data failed'
established() { netstat -tn 2>/dev/null | grep -c "127\.0\.0\.1:$PORT[[:space:]]*ESTABLISHED"; }
# slice FROM_LINE: the daemon log after line FROM_LINE (1-based count of lines already seen)
slice() { tail -n +$(( $1 + 1 )) $DLOG; }
# took_list TEXT: "N/M" of every hand-over line in TEXT, comma-separated
took_list() { echo "$1" | sed -n 's/.*kernel took \([0-9]*\) of \([0-9]*\) \(fresh \)\{0,1\}sockets.*/\1\/\2/p' | tr '\n' ',' | sed 's/,$//'; }

ms=$(wait_connected nbd0 120 $DAEMON); ok=$(yesno $?)
n=0; while [ $n -lt 100 ] && ! grep -q "kernel took" $DLOG; do sleep 0.1; n=$((n + 1)); done
dbg=no dflags=none
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
if [ -d /sys/kernel/debug/nbd/nbd0 ]; then
    dbg=yes; dflags=$(sed -n 's/^Hex: *//p' /sys/kernel/debug/nbd/nbd0/flags 2>/dev/null)
    note "debugfs nbd0: $(ls /sys/kernel/debug/nbd/nbd0 | tr '\n' ' ')"
fi
note "sysfs nbd0: $(ls /sys/block/nbd0 | tr '\n' ' ')"
result multiconn-start connected=$ok connect_ms=$ms size=$(nbd_bytes nbd0) took=$(took_list "$(cat $DLOG)") \
    established=$(established) backend=$(cat /sys/block/nbd0/backend 2>/dev/null || echo none) \
    debugfs=$dbg debugfs_flags=${dflags:-none} daemon_alive=$(proc_gone $DAEMON && echo no || echo yes)


k0=$(kio_count); n0=$(knbd_count)
rm -f $EV $ST $STOP
nbd-verify run --device /dev/nbd0 --region-mib $REGION_MIB --seed 11 --stop-file $STOP --events $EV --status $ST \
    > /tmp/mc-report 2>/tmp/mc-verr &
VPID=$!
sleep 2

# server_round R NAME: nbdkit SIGKILLed and restarted after 1..3 s; prints RESULT NAME round=R ... and leaves SERVED,
# LAST, EST, CYCLES and STALL for the caller's totals.
server_round() {
    local r=$1 name=$2 down l0 kr0 kn0 T0 T END s after took
    down=$(( (r - 1) % 3 + 1 ))
    l0=$(wc -l < $DLOG); kr0=$(kio_count); kn0=$(knbd_count)
    echo "SCENARIO $(date +%H:%M:%S) $name $r: nbdkit SIGKILL, back after $down s" >> $DLOG
    T0=$(nbd-verify now)
    kill -KILL $KIT; wait $KIT 2>/dev/null
    sleep $down
    start_kit
    T=$(nbd-verify waitport $PORT 20) || T=$(nbd-verify now)
    wait_served "$ST" "$T" 60
    sleep $SETTLE_S
    END=$(nbd-verify now)
    s=$(slice "$l0")
    CYCLES=$(echo "$s" | grep -c 'Serving -> Reconnecting')
    # needless: a Serving -> Reconnecting after this round's first hand-over
    after=$(echo "$s" | awk '/kernel took [1-9]/ { h = 1 } h && /Serving -> Reconnecting/ { n++ } END { printf "%d\n", n }')
    took=$(took_list "$s")
    LAST=${took##*,}
    EST=$(established)
    STALL=$(stall_after "$EV" "$T" "$END")
    result $name round=$r down_s=$down served_again=$SERVED first_ok_after_back_ms=$SERVED_MS \
        stall_after_back_ms=$STALL app_io_errors=$(count_between "$EV" error "$T0" "$END") \
        verify_failures=$(count_between "$EV" verify_fail "$T0" "$END") kernel_io_errors=$(( $(kio_count) - kr0 )) \
        kernel_nbd_lines=$(( $(knbd_count) - kn0 )) \
        reconnect_cycles=$CYCLES cycles_after_handover=$after handovers=$(echo "$s" | grep -c 'kernel took') \
        took=${took:-none} last_took=${LAST:-none} established=$EST \
        link_dead=$(echo "$s" | grep -c -- '-> Reconnecting; connection lost (LINK_DEAD') \
        socket_ended=$(echo "$s" | grep -- '-> Reconnecting; connection lost (' | grep -c 'socket [0-9]* of [0-9]*:') \
        kernel_dead_slots=$(dmesg | grep 'nbd0' | tail -n +$(( kn0 + 1 )) | grep -c "$SLOT_DEATH") \
        stale_ignored=$(echo "$s" | grep -c 'LINK_DEAD for an earlier connection ignored') \
        size=$(nbd_bytes nbd0) daemon_alive=$(proc_gone $DAEMON && echo no || echo yes)
    # the log around every transition of the round, for a needless cycle to be read in the console
    echo "$s" | grep -v '^   at \|^   --- End\|^ ---> ' | grep -i 'Serving\|kernel took\|LINK_DEAD\|socket [0-9]* of\|SCENARIO\|-> Reconnecting\|adopted' \
        | head -n 40 | sed "s/^/LOG $name-$r: /"
    dmesg | grep 'nbd0' | tail -n +$(( kn0 + 1 )) | head -n 20 | sed "s/^/LOG dmesg-$name-$r: /"
}

SERVED_ROUNDS=0 TWO_OF_TWO_ROUNDS=0 ONE_CYCLE_ROUNDS=0 TOTAL_CYCLES=0 MAX_STALL=0
r=1
while [ $r -le "$R" ]; do
    server_round $r multiconn-round
    [ "$SERVED" = yes ] && SERVED_ROUNDS=$((SERVED_ROUNDS + 1))
    [ "$STALL" -gt "$MAX_STALL" ] && MAX_STALL=$STALL
    [ "$LAST" = "$CONNECTIONS/$CONNECTIONS" ] && [ "$EST" = "$CONNECTIONS" ] && TWO_OF_TWO_ROUNDS=$((TWO_OF_TWO_ROUNDS + 1))
    [ "$CYCLES" = 1 ] && ONE_CYCLE_ROUNDS=$((ONE_CYCLE_ROUNDS + 1))
    TOTAL_CYCLES=$((TOTAL_CYCLES + CYCLES))
    r=$((r + 1))
done

# Adoption with two connections: the daemon is SIGKILLed (the kernel keeps serving on its two TCP connections) and
# started again; the new process must adopt the device (backend nbd-daemon:mc) without a CONNECT, and then handle a
# server restart itself: two LINK_DEADs, both sockets handed over again.
#   RESULT multiconn-adopt adopted=yes|no adopt_ms still_alive=yes|no (event 106: kernel took 0 of 2 fresh sockets)
#       connects (NBD_CMD_CONNECT lines of the new process) app_io_errors verify_failures kernel_io_errors established
#   RESULT multiconn-adopted-round ... (the fields of multiconn-round)
l0=$(wc -l < $DLOG); kr0=$(kio_count); T0=$(nbd-verify now)
echo "SCENARIO $(date +%H:%M:%S) daemon SIGKILL, started again" >> $DLOG
kill -KILL $DAEMON; wait $DAEMON 2>/dev/null
nbd-daemon >>$DLOG 2>&1 &
DAEMON=$!
A0=$(nbd-verify now)
n=0; while [ $n -lt 1200 ] && ! slice "$l0" | grep -q 'Mapping mc adopted /dev/nbd0'; do sleep 0.1; n=$((n + 1)); done
A1=$(nbd-verify now)
sleep 2
s=$(slice "$l0")
END=$(nbd-verify now)
result multiconn-adopt adopted=$(echo "$s" | grep -q 'Mapping mc adopted /dev/nbd0' && echo yes || echo no) \
    adopt_ms=$(awk -v a="$A1" -v b="$A0" 'BEGIN { printf "%d", (a - b) * 1000 }') still_alive=$(echo "$s" | grep -q 'its previous connection is still alive' && echo yes || echo no) \
    connects=$(echo "$s" | grep -c 'NBD_CMD_CONNECT') app_io_errors=$(count_between "$EV" error "$T0" "$END") \
    verify_failures=$(count_between "$EV" verify_fail "$T0" "$END") kernel_io_errors=$(( $(kio_count) - kr0 )) \
    established=$(established) size=$(nbd_bytes nbd0) daemon_alive=$(proc_gone $DAEMON && echo no || echo yes)
echo "$s" | grep -v '^   at \|^   --- End\|^ ---> ' | grep -i 'adopted\|Serving\|kernel took\|SCENARIO' | head -n 20 | sed "s/^/LOG adopt: /"
server_round 1 multiconn-adopted-round

touch $STOP
wait_exit $VPID 180 || { kill -KILL $VPID; note "verifier did not finish"; }
report=$(cat /tmp/mc-report)
val() { echo " $report" | sed -n "s/.* $1=\([0-9a-z]*\).*/\1/p"; }
we=$(val write_errors) re=$(val read_errors) fe=$(val final_read_errors) oe=$(val open_errors)
result multiconn rounds=$R connections=$CONNECTIONS \
    app_io_errors=$(( ${we:-0} + ${re:-0} + ${fe:-0} + ${oe:-0} )) write_errors=${we:--1} read_errors=${re:--1} \
    final_read_errors=${fe:--1} open_errors=${oe:--1} \
    kernel_io_errors=$(( $(kio_count) - k0 )) kernel_nbd_lines=$(( $(knbd_count) - n0 )) \
    verify_failures=$(val verify_failures) verify_failures_final=$(val verify_failures_final) \
    final_checked=$(val final_checked) writes=$(val writes) reads=$(val reads) direct=$(val direct) \
    max_gap_ms=$(val max_gap_ms) max_stall_after_back_ms=$MAX_STALL served_rounds=$SERVED_ROUNDS \
    two_of_two_rounds=$TWO_OF_TWO_ROUNDS one_cycle_rounds=$ONE_CYCLE_ROUNDS reconnect_cycles=$TOTAL_CYCLES \
    stale_ignored=$(grep -c 'LINK_DEAD for an earlier connection ignored' $DLOG) \
    size_after=$(nbd_bytes nbd0) daemon_alive=$(proc_gone $DAEMON && echo no || echo yes)
sed "s/^/LOG verifier-stderr: /" /tmp/mc-verr | head -n 5
grep -v '^gap' $EV | head -n 12 | sed "s/^/LOG events: /"
grep '^gap' $EV | sort -t= -k4 -n -r | head -n 5 | sed "s/^/LOG gaps: /"
grep -v '^   at \|^   --- End\|^ ---> ' $DLOG | tail -n 80 | sed 's/^/LOG daemon: /'
daemon_kill $DAEMON TERM
result multiconn-stop exit_rc=$EXIT_RC
kill -KILL $KIT 2>/dev/null

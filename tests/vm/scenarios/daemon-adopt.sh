# The daemon and its netlink devices across daemon restarts (issue 6): one netlink mapping on nbd0 served by a
# single-process nbdkit (`nbdkit -f`, so SIGKILL really ends the connection), OnStop=Leave unless said otherwise.
#  connect     first start: CONNECT, SO_SNDTIMEO read back (the driver sets it to Timeout on the socket it took).
#  killed      daemon SIGKILLed: the device keeps serving reads and writes with no daemon.
#  adopt_alive daemon started again while the kernel's old connection is alive: adopted, 0 of 1 fresh sockets taken.
#  outage      then the server SIGKILLed and restarted 2 s later: I/O issued during the outage completes, no error,
#              data read back; RECONFIGURE's SO_SNDTIMEO read back.
#  adopt_dead  daemon SIGKILLed and server SIGKILLed; I/O issued; daemon started while the server is down (it
#              retries on the 250 ms schedule: the kernel holds I/O), server restarted: adopted by RECONFIGURE
#              (1 of 1 taken) and that I/O completes without error.
#  leave       OnStop=Leave: SIGTERM → exit 0, device still configured and serving; next start adopts it.
#  disconnect  OnStop=Disconnect: SIGTERM → device freed.
#  mismatch    device left configured at 16 MiB, server back with a 32 MiB export: the daemon refuses naming both
#              sizes, the device keeps its size and configuration (never resized, never disconnected).
#  flags       device left configured sending FUA (queue/fua 1: nbdkit's file plugin offers FLUSH and FUA), server
#              back without FUA (nbdkit's fua filter, default fuamode=none): refused naming the flag, device untouched.
. /usr/local/lib/nbdvm.sh
MiB=1048576
PORT=10820
IMG=/tmp/adopt.img
TIMEOUT_S=10
truncate -s 16M $IMG
result tools nbdkit=$(command -v nbdkit >/dev/null && echo yes || echo no) daemon=$(command -v nbd-daemon >/dev/null && echo yes || echo no)

start_kit() { nbdkit -f -i 127.0.0.1 -p $PORT file $IMG & KIT=$!; wait_port $PORT 10; }

write_config() { # ONSTOP
    mkdir -p /etc/nbd-daemon
    cat > /etc/nbd-daemon/appsettings.json <<EOF
{ "Nbd": { "Mappings": [
  { "Name": "adopt", "Uri": "nbd://127.0.0.1:$PORT/", "Device": "/dev/nbd0", "Interface": "Netlink",
    "Timeout": "00:00:$TIMEOUT_S", "OnStop": "$1" }
] } }
EOF
}

N=0
start_daemon() { # sets DPID, LOG
    N=$((N + 1)); LOG=/tmp/daemon-$N.log
    echo "nbd-daemon #$N ($(grep -o '"OnStop": "[A-Za-z]*"' /etc/nbd-daemon/appsettings.json))" > "$LOG"
    nbd-daemon >>"$LOG" 2>&1 &
    DPID=$!
}

# wait_log LOG TEXT TIMEOUT_S: TEXT (fixed string) appears in LOG. Prints elapsed ms.
wait_log() {
    local t0 limit=$(( $3 * 1000 )); t0=$(now_ms)
    while :; do
        grep -qF "$2" "$1" && { echo $(( $(now_ms) - t0 )); return 0; }
        [ $(( $(now_ms) - t0 )) -ge "$limit" ] && { echo $(( $(now_ms) - t0 )); return 1; }
        sleep 0.05
    done
}

# took LOG OPERATION: "taken total sndtimeo" from the last "OPERATION: kernel took N of M sockets (SO_SNDTIMEO read back T s)".
took() {
    grep -F "$2: kernel took" "$1" | tail -n 1 \
        | sed -n 's/.*kernel took \([0-9]*\) of \([0-9]*\) sockets (SO_SNDTIMEO read back \([0-9.]*\) s).*/\1 \2 \3/p'
}

# rw_check OFFSET_MIB: 1 MiB fresh random data written with O_DIRECT, read back, compared (device and image).
rw_check() {
    local want
    head -c $MiB /dev/urandom > /tmp/rw-data; want=$(sha_file /tmp/rw-data)
    timeout 150 dd if=/tmp/rw-data of=/dev/nbd0 bs=1M seek=$1 oflag=direct 2>/tmp/rw-err; RW_W=$?
    timeout 150 dd if=/dev/nbd0 of=/tmp/rw-back bs=1M skip=$1 count=1 iflag=direct 2>>/tmp/rw-err; RW_R=$?
    RW_READBACK=mismatch; [ "$(sha_file /tmp/rw-back)" = "$want" ] && RW_READBACK=match
    RW_BACKING=mismatch
    [ "$(dd if=$IMG bs=1M skip=$1 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$want" ] && RW_BACKING=match
    [ "$RW_W" = 0 ] && [ "$RW_R" = 0 ] || sed 's/^/LOG rw: /' /tmp/rw-err
    rm -f /tmp/rw-back /tmp/rw-data /tmp/rw-err
}

# bg_io OFFSET_MIB OUT: rw_check in the background, issued now; writes "write_rc read_rc readback end_ms" to OUT.
bg_io() { ( rw_check "$1"; echo "$RW_W $RW_R $RW_READBACK $(now_ms)" > "$2" ) & BGPID=$!; }

dev_state() { echo "pid=$([ -e /sys/block/nbd0/pid ] && echo present || echo absent) size=$(nbd_bytes nbd0) backend=$(cat /sys/block/nbd0/backend 2>/dev/null || echo none)"; }

show() { grep -v '^   at \|^   --- End\|^ ---> ' "$1" | sed "s/^/LOG $(basename "$1" .log): /" | tail -n 60; }

write_config Leave
start_kit || note "nbdkit did not start"

# --- connect ------------------------------------------------------------------------------------------------
start_daemon
ms=$(wait_connected nbd0 60 $DPID); ok=$(yesno $?)
wait_log "$LOG" "NBD_CMD_CONNECT: kernel took" 10 >/dev/null
set -- $(took "$LOG" NBD_CMD_CONNECT)
result sndtimeo phase=connect taken=${1:-none} total=${2:-none} seconds=${3:-none} timeout=$TIMEOUT_S
rw_check 0
result connect connected=$ok connect_ms=$ms $(dev_state) write_rc=$RW_W read_rc=$RW_R readback=$RW_READBACK backing=$RW_BACKING
show "$LOG"

# --- killed: no daemon, the kernel serves on its own sockets ------------------------------------------------
kill -KILL $DPID; wait $DPID 2>/dev/null
sleep 1
rw_check 1
result killed daemon_alive=$(proc_gone $DPID && echo no || echo yes) $(dev_state) write_rc=$RW_W read_rc=$RW_R readback=$RW_READBACK backing=$RW_BACKING

# --- adopt_alive --------------------------------------------------------------------------------------------
start_daemon
ams=$(wait_log "$LOG" "adopted /dev/nbd0" 60); found=$(yesno $?)
alive=$(grep -qF "previous connection is still alive" "$LOG" && echo yes || echo no)
rw_check 2
result adopt_alive adopted=$found adopt_ms=$ams still_alive_logged=$alive connects=$(grep -c "NBD_CMD_CONNECT" "$LOG") \
    $(dev_state) write_rc=$RW_W read_rc=$RW_R readback=$RW_READBACK backing=$RW_BACKING

# --- outage under the adopted mapping -----------------------------------------------------------------------
kill -KILL $KIT; wait $KIT 2>/dev/null
t_kill=$(now_ms)
sleep 0.3
rm -f /tmp/bg-out; bg_io 3 /tmp/bg-out
sleep 2
start_kit || note "nbdkit restart failed"
t_restart=$(now_ms)
rms=$(wait_log "$LOG" "NBD_CMD_RECONFIGURE: kernel took" 60); reconf=$(yesno $?)
wait $BGPID
read -r bw br brb bend < /tmp/bg-out
wait_log "$LOG" "NBD_CMD_RECONFIGURE: kernel took" 10 >/dev/null
set -- $(took "$LOG" NBD_CMD_RECONFIGURE)
result sndtimeo phase=reconfigure taken=${1:-none} total=${2:-none} seconds=${3:-none} timeout=$TIMEOUT_S
result outage reconfigured=$reconf reconfigured_after_restart_ms=$rms write_rc=$bw read_rc=$br readback=$brb io_done_after_restart_ms=$(( bend - t_restart )) \
    io_done_after_kill_ms=$(( bend - t_kill )) daemon_alive=$(proc_gone $DPID && echo no || echo yes) $(dev_state) \
    reconnecting_lines=$(grep -c -- '-> Reconnecting' "$LOG")
show "$LOG"

# --- adopt_dead: daemon and server both gone, I/O waits; the daemon starts while the server is still down ------
kill -KILL $DPID; wait $DPID 2>/dev/null
kill -KILL $KIT; wait $KIT 2>/dev/null
sleep 0.5
rm -f /tmp/bg-out; bg_io 4 /tmp/bg-out
start_daemon
retrying=$(wait_log "$LOG" "connection refused" 90 >/dev/null; yesno $?)
first_retry_s=$(grep -o "connection refused; attempt [0-9]* in [0-9.]* s" "$LOG" | head -n 1 | sed 's/.* in \([0-9.]*\) s/\1/')
sleep 1
start_kit || note "nbdkit restart failed"
t_restart=$(now_ms)
ams=$(wait_log "$LOG" "adopted /dev/nbd0" 60); found=$(yesno $?)
wait $BGPID
read -r bw br brb bend < /tmp/bg-out
# the I/O may complete before the daemon has logged what it read back
wait_log "$LOG" "NBD_CMD_RECONFIGURE (adopt): kernel took" 20 >/dev/null
set -- $(took "$LOG" "NBD_CMD_RECONFIGURE (adopt)")
result sndtimeo phase=adopt taken=${1:-none} total=${2:-none} seconds=${3:-none} timeout=$TIMEOUT_S
result adopt_dead retrying_before_server=$retrying first_retry_s=${first_retry_s:-none} adopted=$found \
    adopted_after_restart_ms=$ams write_rc=$bw read_rc=$br readback=$brb io_done_after_restart_ms=$(( bend - t_restart )) \
    connects=$(grep -c "NBD_CMD_CONNECT" "$LOG") $(dev_state)
show "$LOG"

# --- leave: SIGTERM with OnStop=Leave ---------------------------------------------------------------------
kill -TERM $DPID
wait_exit $DPID 20 || { kill -KILL $DPID; wait $DPID; }
rc=$EXIT_RC
sleep 1
rw_check 5
result leave exit_rc=$rc left_logged=$(grep -qF "OnStop=Leave, device left configured" "$LOG" && echo yes || echo no) \
    $(dev_state) write_rc=$RW_W read_rc=$RW_R readback=$RW_READBACK backing=$RW_BACKING
start_daemon
ams=$(wait_log "$LOG" "adopted /dev/nbd0" 60); found=$(yesno $?)
result leave_restart adopted=$found adopt_ms=$ams connects=$(grep -c "NBD_CMD_CONNECT" "$LOG") $(dev_state)
kill -TERM $DPID
wait_exit $DPID 20 || { kill -KILL $DPID; wait $DPID; }

# --- disconnect: OnStop=Disconnect ------------------------------------------------------------------------
write_config Disconnect
start_daemon
ams=$(wait_log "$LOG" "adopted /dev/nbd0" 60); found=$(yesno $?)
kill -TERM $DPID
wait_exit $DPID 20 || { kill -KILL $DPID; wait $DPID; }
rc=$EXIT_RC
fms=$(wait_free nbd0 10); freed=$(yesno $?)
result disconnect adopted_first=$found exit_rc=$rc freed=$freed freed_ms=$fms $(dev_state)
show "$LOG"

# --- mismatch: device left at 16 MiB, export now 32 MiB ---------------------------------------------------
write_config Leave
start_daemon
wait_connected nbd0 60 $DPID >/dev/null; ok=$(yesno $?)
kill -KILL $DPID; wait $DPID 2>/dev/null
before=$(nbd_bytes nbd0)
kill -KILL $KIT; wait $KIT 2>/dev/null
truncate -s 32M $IMG
start_kit || note "nbdkit restart failed"
start_daemon
rms=$(wait_log "$LOG" "export is 33554432 bytes but /dev/nbd0 (left configured by an earlier daemon) is 16777216 bytes" 60)
refused=$(yesno $?)
sleep 4   # a few more refused attempts (backoff 1 s, 2 s)
attempts=$(grep -c -- "-> Negotiating" "$LOG")
result mismatch connected_first=$ok size_before=$before refused=$refused refused_ms=$rms attempts_logged=$attempts \
    daemon_alive=$(proc_gone $DPID && echo no || echo yes) size_after=$(nbd_bytes nbd0) \
    pid_after=$([ -e /sys/block/nbd0/pid ] && echo present || echo absent) \
    connects=$(grep -c "NBD_CMD_CONNECT" "$LOG") \
    size_sysfs_after=$(( $(cat /sys/block/nbd0/size) * 512 ))
kill -TERM $DPID
wait_exit $DPID 20 || { kill -KILL $DPID; wait $DPID; }
result mismatch_stop exit_rc=$EXIT_RC $(dev_state)
show "$LOG"
kill -KILL $KIT 2>/dev/null

# --- flags: device left sending FUA, server back without it -----------------------------------------------
truncate -s 16M $IMG
start_kit || note "nbdkit restart failed"
write_config Disconnect
start_daemon
wait_log "$LOG" "adopted /dev/nbd0" 60 >/dev/null
kill -TERM $DPID
wait_exit $DPID 20 || { kill -KILL $DPID; wait $DPID; }
wait_free nbd0 10 >/dev/null; freed=$(yesno $?)
write_config Leave
start_daemon
wait_connected nbd0 60 $DPID >/dev/null; ok=$(yesno $?)
fua_before=$(cat /sys/block/nbd0/queue/fua); cache_before=$(tr ' ' _ < /sys/block/nbd0/queue/write_cache)
kill -KILL $DPID; wait $DPID 2>/dev/null
kill -KILL $KIT; wait $KIT 2>/dev/null
# fuamode=none is the default; nbdkit 1.32 refuses it spelt out ("unknown fuamode").
nbdkit -f -i 127.0.0.1 -p $PORT --filter=fua file $IMG & KIT=$!
wait_port $PORT 10 || note "nbdkit with the fua filter did not start"
start_daemon
rms=$(wait_log "$LOG" "export does not offer NBD_FLAG_SEND_FUA, which /dev/nbd0 (left configured by an earlier daemon) sends" 60)
refused=$(yesno $?)
result flags freed_first=$freed connected_first=$ok fua_before=$fua_before write_cache_before=$cache_before refused=$refused \
    refused_ms=$rms daemon_alive=$(proc_gone $DPID && echo no || echo yes) connects=$(grep -c "NBD_CMD_CONNECT" "$LOG") \
    fua_after=$(cat /sys/block/nbd0/queue/fua) $(dev_state)
kill -TERM $DPID
wait_exit $DPID 20 || { kill -KILL $DPID; wait $DPID; }
show "$LOG"
kill -KILL $KIT 2>/dev/null

# The daemon (no verb) with configured mappings, on the real driver; one boot, for ioctl and netlink:
#  late      three mappings (nbd-server, nbdkit file, qemu-nbd) on nbd0..2 while qemu-nbd is still down: the other
#            two connect; qemu-nbd started later connects within the backoff (InitialDelay 1 s, MaxDelay 2 s).
#  data      4 MiB O_DIRECT write + read back on each device, and the backing file holds it.
#  outage    one server SIGKILLed and restarted 2 s later on the same port and file: time until new I/O on its
#            device succeeds, what a reader saw on that device meanwhile, and I/O on the two others throughout.
#  stop      SIGTERM: exit code, time to exit, every device freed.
#  twin      the same Netlink mapping in a second daemon beside the first: refused naming the first's pid; its Ctrl-C
#            leaves the device serving.
#  busypick  a Netlink mapping without Device whose first choice (nbd1) is open elsewhere without a configuration
#            (CONNECT: EBUSY): it takes another device.
#  maxreq    nbdkit announcing and enforcing a 64 KiB maximum request: the daemon caps the device's requests
#            (queue/max_sectors_kb), for an Ioctl and a Netlink mapping, so 1 MiB direct I/O works.
# Once: badconfig  Interface=Bogus / duplicate Device → exit 78, key named on stderr, no device touched, and a
#            mapping made beforehand by `nbd-daemon connect` on nbd5 left alone.
# ioctl is configured on the command line, netlink through /etc/nbd-daemon/appsettings.json (both sources used).
. /usr/local/lib/nbdvm.sh
MiB=1048576
KiB=1024
truncate -s 20M /tmp/srv.img /tmp/kit.img /tmp/qemu.img
PORT_SRV=10809 PORT_KIT=10810 PORT_QEMU=10811

start_nbd_server $PORT_SRV srv /tmp/srv.img || note "nbd-server did not start"
start_kit() { nbdkit -i 127.0.0.1 -p $PORT_KIT -P /run/nbdkit.pid file /tmp/kit.img && wait_port $PORT_KIT 10; }
start_qemu() {
    qemu-nbd -f raw -x qexp -b 127.0.0.1 -p $PORT_QEMU -t --fork --pid-file=/run/qemu-nbd.pid /tmp/qemu.img \
        && wait_port $PORT_QEMU 10
}
start_kit || note "nbdkit did not start"
# which tools exist at all: the host-side test turns a missing one into a failure with this line
result tools nbd_server=$(command -v nbd-server >/dev/null && echo yes || echo no) \
    nbdkit=$(command -v nbdkit >/dev/null && echo yes || echo no) qemu_nbd=$(command -v qemu-nbd >/dev/null && echo yes || echo no) \
    daemon=$(command -v nbd-daemon >/dev/null && echo yes || echo no)

# device index → server name / backing file / port
srv_of() { case $1 in 0) echo nbd-server ;; 1) echo nbdkit ;; 2) echo qemu-nbd ;; esac; }
img_of() { case $1 in 0) echo /tmp/srv.img ;; 1) echo /tmp/kit.img ;; 2) echo /tmp/qemu.img ;; esac; }

# rw_check DEV OFFSET_MIB COUNT_MIB TAG: writes fresh random data with O_DIRECT, reads it back, compares with the
# device and the backing file. Sets RW_W RW_R (rc), RW_WMS RW_RMS, RW_READBACK, RW_BACKING.
rw_check() {
    local dev=$1 off=$2 cnt=$3 i=${1#nbd} want t0
    head -c $((cnt * MiB)) /dev/urandom > /tmp/rw-data
    want=$(sha_file /tmp/rw-data)
    t0=$(now_ms); timeout 120 dd if=/tmp/rw-data of=/dev/$dev bs=1M seek=$off oflag=direct 2>/tmp/rw-err; RW_W=$?
    RW_WMS=$(( $(now_ms) - t0 ))
    t0=$(now_ms); timeout 120 dd if=/dev/$dev of=/tmp/rw-back bs=1M skip=$off count=$cnt iflag=direct 2>>/tmp/rw-err; RW_R=$?
    RW_RMS=$(( $(now_ms) - t0 ))
    RW_READBACK=mismatch; [ "$(sha_file /tmp/rw-back)" = "$want" ] && RW_READBACK=match
    RW_BACKING=mismatch
    [ "$(dd if="$(img_of $i)" bs=1M skip=$off count=$cnt 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$want" ] && RW_BACKING=match
    [ "$RW_W" = 0 ] && [ "$RW_R" = 0 ] || sed "s/^/LOG rw-$dev: /" /tmp/rw-err
    rm -f /tmp/rw-back /tmp/rw-data /tmp/rw-err
}

# probe_read DEV [TAG]: one 64 KiB O_DIRECT read at 1 MiB that really returned 64 KiB (a size-0 device reads 0 bytes,
# rc 0). Callers that may overlap pass distinct TAGs: dd truncates its output file when it opens it, so a second dd on
# the same file could empty it between the first one's write and its size check (a read that never was short).
# On failure PROBE_ERR says why: dd's message, else rc_N (124: the timeout), else short_N (N bytes in the file).
probe_read() {
    local tag=${2:-$1} rc size
    timeout 60 dd if=/dev/$1 of=/tmp/probe-$tag bs=64k skip=16 count=1 iflag=direct 2>/tmp/probe-err-$tag; rc=$?
    size=$(stat -c %s /tmp/probe-$tag 2>/dev/null || echo none)
    [ "$rc" = 0 ] && [ "$size" = 65536 ] && return 0
    PROBE_ERR=$(grep -v records /tmp/probe-err-$tag | head -n1 | sed 's/.*: //; s/[^A-Za-z0-9]/_/g')
    if [ -z "$PROBE_ERR" ]; then
        if [ "$rc" != 0 ]; then PROBE_ERR=rc_$rc; else PROBE_ERR=short_$size; fi
    fi
    return 1
}

# others_io DEV STOPFILE OUT: 256 KiB write + O_DIRECT read-back compare at 16 MiB, over and over until STOPFILE
# exists; writes "ops fails" to OUT.
others_io() {
    local dev=$1 stop=$2 out=$3 ops=0 fails=0
    head -c $((256 * KiB)) /dev/urandom > /tmp/oio-$dev
    while [ ! -e "$stop" ]; do
        ops=$((ops + 1))
        if ! timeout 60 dd if=/tmp/oio-$dev of=/dev/$dev bs=256k seek=64 count=1 oflag=direct 2>/dev/null \
            || ! timeout 60 dd if=/dev/$dev of=/tmp/oio-back-$dev bs=256k skip=64 count=1 iflag=direct 2>/dev/null \
            || ! cmp -s /tmp/oio-$dev /tmp/oio-back-$dev; then
            fails=$((fails + 1))
        fi
        sleep 0.1
    done
    echo "$ops $fails" > "$out"
}

# victim_io DEV STOPFILE OUT: reads on the killed server's device during the outage; "ops fails first_error" to OUT.
victim_io() {
    local dev=$1 stop=$2 out=$3 ops=0 fails=0 err=none
    while [ ! -e "$stop" ]; do
        ops=$((ops + 1))
        if ! probe_read "$dev" victim; then
            fails=$((fails + 1))
            if [ "$err" = none ]; then err=$PROBE_ERR; fi
        fi
        sleep 0.1
    done
    echo "$ops $fails $err" > "$out"
}

write_json_config() { # MODE
    mkdir -p /etc/nbd-daemon
    cat > /etc/nbd-daemon/appsettings.json <<EOF
{ "Nbd": { "Mappings": [
  { "Name": "srv", "Uri": "nbd://127.0.0.1:$PORT_SRV/srv", "Device": "/dev/nbd0", "Interface": "$1",
    "DeadConnectionTimeout": "00:00:30", "Reconnect": { "InitialDelay": "00:00:01", "MaxDelay": "00:00:02" } },
  { "Name": "kit", "Uri": "nbd://127.0.0.1:$PORT_KIT/kit", "Device": "/dev/nbd1", "Interface": "$1",
    "DeadConnectionTimeout": "00:00:30", "Reconnect": { "InitialDelay": "00:00:01", "MaxDelay": "00:00:02" } },
  { "Name": "qemu", "Uri": "nbd://127.0.0.1:$PORT_QEMU/qexp", "Device": "/dev/nbd2", "Interface": "$1",
    "DeadConnectionTimeout": "00:00:30", "Reconnect": { "InitialDelay": "00:00:01", "MaxDelay": "00:00:02" } }
] } }
EOF
}

cmdline_args() { # MODE
    local i=0 n u
    for n in srv kit qemu; do
        case $n in
            srv) u=nbd://127.0.0.1:$PORT_SRV/srv ;;
            kit) u=nbd://127.0.0.1:$PORT_KIT/kit ;;
            qemu) u=nbd://127.0.0.1:$PORT_QEMU/qexp ;;
        esac
        echo "--Nbd:Mappings:$i:Name=$n --Nbd:Mappings:$i:Uri=$u --Nbd:Mappings:$i:Device=/dev/nbd$i"
        echo "--Nbd:Mappings:$i:Interface=$1 --Nbd:Mappings:$i:Reconnect:InitialDelay=00:00:01"
        echo "--Nbd:Mappings:$i:Reconnect:MaxDelay=00:00:02"
        i=$((i + 1))
    done
}

run_mode() { # MODE KILLED_INDEX
    local mode=$1 k=$2 log=/tmp/daemon-$1.log pid i c0 c1 up late_ms before_late
    local kname kill_pid t_kill t_restart rec_ms rec_after_kill_ms
    if [ "$mode" = Netlink ]; then
        write_json_config "$mode"
        echo "nbd-daemon (config: /etc/nbd-daemon/appsettings.json)" > "$log"
        nbd-daemon >>"$log" 2>&1 &
    else
        rm -f /etc/nbd-daemon/appsettings.json
        echo "nbd-daemon $(cmdline_args "$mode" | tr '\n' ' ')" > "$log"
        # shellcheck disable=SC2046
        nbd-daemon $(cmdline_args "$mode") >>"$log" 2>&1 &
    fi
    pid=$!
    # --- late: qemu-nbd is down now -------------------------------------------------------------------------
    c0=$(wait_connected nbd0 60 $pid); ok0=$(yesno $?)
    c1=$(wait_connected nbd1 60 $pid); ok1=$(yesno $?)
    sleep 3   # several backoff rounds for the down mapping
    before_late=$([ -e /sys/block/nbd2/pid ] && echo connected || echo free)
    alive=$(proc_gone $pid && echo no || echo yes)
    start_qemu || note "qemu-nbd did not start"
    late_ms=$(wait_connected nbd2 30 $pid); late_ok=$(yesno $?)
    result late mode=$mode nbd0_connected=$ok0 nbd0_ms=$c0 nbd1_connected=$ok1 nbd1_ms=$c1 \
        nbd2_before_server=$before_late daemon_alive=$alive nbd2_connected=$late_ok nbd2_after_server_ms=$late_ms
    # --- data -----------------------------------------------------------------------------------------------
    local off=0; [ "$mode" = Netlink ] && off=8
    for i in 0 1 2; do
        rw_check nbd$i $off 4
        result data mode=$mode server=$(srv_of $i) dev=nbd$i size=$(nbd_bytes nbd$i) pid=$([ -e /sys/block/nbd$i/pid ] && echo present || echo absent) \
            write_rc=$RW_W write_ms=$RW_WMS read_rc=$RW_R read_ms=$RW_RMS readback=$RW_READBACK backing=$RW_BACKING
    done
    # --- outage ---------------------------------------------------------------------------------------------
    kname=$(srv_of $k)
    local o1 o2 others="" j
    for j in 0 1 2; do [ "$j" != "$k" ] && others="$others $j"; done
    rm -f /tmp/stop-io /tmp/stop-victim /tmp/io-*
    local pids_before="" iopids=""
    for j in $others; do
        pids_before="$pids_before$(nbd_pid nbd$j),"
        others_io nbd$j /tmp/stop-io /tmp/io-nbd$j &
        iopids="$iopids $!"
    done
    victim_io nbd$k /tmp/stop-victim /tmp/io-victim &
    local vpid=$!
    sleep 1
    case $kname in
        nbdkit) kill_pid=$(cat /run/nbdkit.pid) ;;
        qemu-nbd) kill_pid=$(cat /run/qemu-nbd.pid) ;;
    esac
    t_kill=$(now_ms)
    kill -KILL "$kill_pid"
    sleep 2
    case $kname in
        nbdkit) start_kit || note "nbdkit restart failed" ;;
        qemu-nbd) start_qemu || note "qemu-nbd restart failed" ;;
    esac
    t_restart=$(now_ms)
    # the first new I/O that succeeds on the victim device after the restart
    local recovered=no n=0
    while [ $(( $(now_ms) - t_restart )) -lt 60000 ]; do
        n=$((n + 1))
        if probe_read nbd$k; then recovered=yes; break; fi
        sleep 0.1
    done
    rec_ms=$(( $(now_ms) - t_restart )); rec_after_kill_ms=$(( $(now_ms) - t_kill ))
    touch /tmp/stop-victim
    wait $vpid
    # keep the others' I/O going a little past the recovery, then stop it
    sleep 1
    touch /tmp/stop-io
    for j in $iopids; do wait "$j"; done
    read -r vops vfails verr < /tmp/io-victim
    local oops=0 ofails=0 a b
    for j in $others; do
        read -r a b < /tmp/io-nbd$j; oops=$((oops + a)); ofails=$((ofails + b))
    done
    local pids_after=""
    for j in $others; do pids_after="$pids_after$(nbd_pid nbd$j),"; done
    rw_check nbd$k $((off + 4)) 4
    local reconnects
    reconnects=$(grep -c 'Reconnecting' "$log")
    result outage mode=$mode killed=$kname dev=nbd$k recovered=$recovered recover_after_restart_ms=$rec_ms \
        recover_after_kill_ms=$rec_after_kill_ms probes=$n victim_ops=$vops victim_fails=$vfails victim_first_error=$verr \
        others_ops=$oops others_fails=$ofails others_pids_kept=$([ "$pids_before" = "$pids_after" ] && echo yes || echo no) \
        size=$(nbd_bytes nbd$k) write_rc=$RW_W read_rc=$RW_R readback=$RW_READBACK backing=$RW_BACKING \
        daemon_alive=$(proc_gone $pid && echo no || echo yes) reconnecting_lines=$reconnects
    # --- stop -----------------------------------------------------------------------------------------------
    local t0 f0 f1 f2
    # wall-clock markers in the daemon's own log (same clock as its timestamps; busybox date has whole seconds)
    echo "SCENARIO $(date +%H:%M:%S) SIGTERM sent" >> "$log"
    local disc_failed0
    disc_failed0=$(dmesg | grep -c 'Send disconnect failed')
    t0=$(now_ms)
    kill -TERM $pid
    wait_exit $pid 15 || { kill -KILL $pid; wait $pid; }
    echo "SCENARIO $(date +%H:%M:%S) exited rc=$EXIT_RC after $EXIT_MS ms" >> "$log"
    local exit_rc=$EXIT_RC exit_ms=$EXIT_MS
    f0=$(wait_free nbd0 5 >/dev/null; yesno $?); f1=$(wait_free nbd1 5 >/dev/null; yesno $?); f2=$(wait_free nbd2 5 >/dev/null; yesno $?)
    result stop mode=$mode exit_rc=$exit_rc exit_ms=$exit_ms all_freed_ms=$(( $(now_ms) - t0 )) nbd0_freed=$f0 nbd1_freed=$f1 nbd2_freed=$f2 \
        sizes=$(nbd_bytes nbd0),$(nbd_bytes nbd1),$(nbd_bytes nbd2) \
        disconnect_failed_lines=$(( $(dmesg | grep -c 'Send disconnect failed') - disc_failed0 ))
    # the daemon's log without stack frames: the start, and the end (outage and stop)
    grep -v '^   at \|^   --- End\|^ ---> ' "$log" > /tmp/log-short
    if [ "$(wc -l < /tmp/log-short)" -le 140 ]; then sed "s/^/LOG daemon-$mode: /" /tmp/log-short
    else head -n 40 /tmp/log-short | sed "s/^/LOG daemon-$mode: /"; echo "LOG daemon-$mode: ..."
         tail -n 100 /tmp/log-short | sed "s/^/LOG daemon-$mode: /"; fi
    # qemu-nbd down again for the next mode's "late" step
    kill -KILL "$(cat /run/qemu-nbd.pid)" 2>/dev/null
    sleep 0.5
}

run_mode Ioctl 1      # nbdkit killed
run_mode Netlink 2    # qemu-nbd killed (it was started late in this run, and restarts again)
rm -f /etc/nbd-daemon/appsettings.json

# --- bad configuration ----------------------------------------------------------------------------------------
daemon_connect /tmp/pre.log nbd://127.0.0.1:$PORT_SRV/srv /dev/nbd5
PRE=$DPID
wait_connected nbd5 60 $PRE >/dev/null; pre_ok=$(yesno $?)
pre_pid=$(nbd_pid nbd5)

badconfig() { # CASE KEY ARGS...
    local case=$1 key=$2 t0 rc ms d touched=""; shift 2
    t0=$(now_ms)
    timeout 60 "$@" >/tmp/bad-$case.out 2>/tmp/bad-$case.err; rc=$?
    ms=$(( $(now_ms) - t0 ))
    for d in 0 1 2 3 4; do
        { [ "$(cat /sys/block/nbd$d/size)" != 0 ] || [ -e /sys/block/nbd$d/pid ]; } && touched="${touched}nbd$d,"
    done
    result badconfig case=$case exit_rc=$rc exit_ms=$ms key_named=$(grep -qF "$key" /tmp/bad-$case.err && echo yes || echo no) \
        touched=${touched:-none} pre_pid_kept=$([ "$(nbd_pid nbd5)" = "$pre_pid" ] && echo yes || echo no) \
        pre_size=$(nbd_bytes nbd5) pre_read=$(probe_read nbd5 && echo ok || echo fail)
    sed "s/^/LOG bad-$case stderr: /" /tmp/bad-$case.err
    sed "s/^/LOG bad-$case stdout: /" /tmp/bad-$case.out
}
result pre connected=$pre_ok
# A valid mapping next to the bad one must not be started either.
badconfig interface Nbd:Mappings:1:Interface nbd-daemon \
    --Nbd:Mappings:0:Name=good --Nbd:Mappings:0:Uri=nbd://127.0.0.1:$PORT_SRV/srv --Nbd:Mappings:0:Device=/dev/nbd3 \
    --Nbd:Mappings:1:Name=bad --Nbd:Mappings:1:Uri=nbd://127.0.0.1:$PORT_KIT/kit --Nbd:Mappings:1:Device=/dev/nbd4 \
    --Nbd:Mappings:1:Interface=Bogus
# through the environment this time
badconfig duplicate Nbd:Mappings:1:Device env \
    Nbd__Mappings__0__Name=a Nbd__Mappings__0__Uri=nbd://127.0.0.1:$PORT_SRV/srv Nbd__Mappings__0__Device=/dev/nbd3 \
    Nbd__Mappings__1__Name=b Nbd__Mappings__1__Uri=nbd://127.0.0.1:$PORT_KIT/kit Nbd__Mappings__1__Device=/dev/nbd3 \
    nbd-daemon
# the device of the `connect` mapping itself in the config: still not touched
badconfig busydevice Nbd:Mappings:1:Interface nbd-daemon \
    --Nbd:Mappings:0:Name=x --Nbd:Mappings:0:Uri=nbd://127.0.0.1:$PORT_SRV/srv --Nbd:Mappings:0:Device=/dev/nbd5 \
    --Nbd:Mappings:1:Name=y --Nbd:Mappings:1:Uri=nbd://127.0.0.1:$PORT_KIT/kit --Nbd:Mappings:1:Interface=Bogus
# a valid Ioctl mapping naming that device: refused at every attempt without an ioctl (SET_BLKSIZE, SET_SIZE have no
# owner check, and the cleanup's NBD_CLEAR_SOCK would end the other client's connection)
# kit_daemon NAME DEV LOG WHAT…: the daemon with one mapping NAME of nbdkit's export on DEV (Interface $KIT_IFACE,
# Ioctl unless set), retried every second, its output in LOG (first line: WHAT); DPID is its pid.
kit_daemon() {
    local name=$1 dev=$2 log=$3; shift 3
    echo "nbd-daemon ($*)" > "$log"
    nbd-daemon --Nbd:Mappings:0:Name="$name" --Nbd:Mappings:0:Uri=nbd://127.0.0.1:$PORT_KIT/kit --Nbd:Mappings:0:Device="$dev" \
        --Nbd:Mappings:0:Interface="${KIT_IFACE:-Ioctl}" --Nbd:Mappings:0:Reconnect:InitialDelay=00:00:01 \
        --Nbd:Mappings:0:Reconnect:MaxDelay=00:00:01 >>"$log" 2>&1 &
    DPID=$!
}
busy_log=/tmp/busy.log
kit_daemon busy /dev/nbd5 $busy_log Ioctl mapping on /dev/nbd5, held by connect
BUSY=$DPID
busy_t0=$(now_ms)
while [ "$(grep -c 'is in use by another client' $busy_log)" -lt 2 ] && [ $(( $(now_ms) - busy_t0 )) -lt 90000 ] \
    && ! proc_gone $BUSY; do
    sleep 0.2
done
busy_refusals=$(grep -c 'is in use by another client' $busy_log)
daemon_kill $BUSY TERM
result busydevice_valid refusals=$busy_refusals exit_rc=$EXIT_RC pre_pid_kept=$([ "$(nbd_pid nbd5)" = "$pre_pid" ] && echo yes || echo no) \
    pre_size=$(nbd_bytes nbd5) pre_read=$(probe_read nbd5 && echo ok || echo fail)
grep -m 3 'nbd5' $busy_log | sed 's/^/LOG busy: /'
# the same through `connect` with a block size and read-only: refused before any ioctl, exit 1, nbd5 as it was
lbs_before=$(cat /sys/block/nbd5/queue/logical_block_size)
timeout 60 nbd-daemon connect nbd://127.0.0.1:$PORT_KIT/kit /dev/nbd5 --interface ioctl --block-size 512 --read-only \
    >/tmp/busy-connect.out 2>/tmp/busy-connect.err; busy_rc=$?
result busydevice_connect exit_rc=$busy_rc said_in_use=$(grep -q 'in use by another client' /tmp/busy-connect.err && echo yes || echo no) \
    pre_pid_kept=$([ "$(nbd_pid nbd5)" = "$pre_pid" ] && echo yes || echo no) pre_size=$(nbd_bytes nbd5) \
    lbs_before=$lbs_before lbs_kept=$([ "$(cat /sys/block/nbd5/queue/logical_block_size)" = "$lbs_before" ] && echo yes || echo no) \
    pre_ro=$(cat /sys/block/nbd5/ro) pre_read=$(probe_read nbd5 && echo ok || echo fail)
sed 's/^/LOG busy-connect: /' /tmp/busy-connect.err | head -n 3
daemon_kill $PRE TERM
result pre_stop exit_rc=$EXIT_RC freed=$(wait_free nbd5 5 >/dev/null; yesno $?)

# --- held: an Ioctl device held open (as by a mounted filesystem) across a server restart -----------------------
# The driver keeps the old connection's configuration until the last close: a reconnect cannot work until then, and
# NBD_SET_SOCK would still succeed, leaving one more kernel-held server connection per retry. The mapping must refuse
# each attempt before SET_SOCK, and serve again once the device is closed.
held_log=/tmp/held.log
kit_daemon held /dev/nbd6 $held_log Ioctl mapping on /dev/nbd6, held open across an nbdkit restart
HELD=$DPID
wait_connected nbd6 60 $HELD >/dev/null; held_ok=$(yesno $?)
exec 7</dev/nbd6
kill -KILL "$(cat /run/nbdkit.pid)"
sleep 1
start_kit 7<&- || note "nbdkit restart failed"   # the server must not inherit the holder's descriptor
sleep 8   # about six 1 s retries while the device is held
held_refusals=$(grep -c 'still held open' $held_log)
# client-side connections to nbdkit that are still established (remote port 10810 = 0x2A3A)
held_conns=$(awk 'NR > 1 && $3 ~ /:2A3A$/ && $4 == "01"' /proc/net/tcp | wc -l)
held_pid=$(nbd_pid nbd6)
serving_before=$(grep -c -- '-> Serving' $held_log)
exec 7<&-
held_t1=$(now_ms)
while [ "$(grep -c -- '-> Serving' $held_log)" -le "$serving_before" ] && [ $(( $(now_ms) - held_t1 )) -lt 30000 ]; do
    sleep 0.1
done
held_ms=$(( $(now_ms) - held_t1 ))
held_back=$([ "$(grep -c -- '-> Serving' $held_log)" -gt "$serving_before" ] && echo yes || echo no)
held_read=$(probe_read nbd6 held && echo ok || echo "fail_$PROBE_ERR")
daemon_kill $HELD TERM
result held connected=$held_ok refusals=$held_refusals established=$held_conns pid_while_held=${held_pid:-none} \
    served_after_close=$held_back after_close_ms=$held_ms read=$held_read exit_rc=$EXIT_RC
grep -v '^   at ' $held_log | tail -n 12 | sed 's/^/LOG held: /'

# --- claims: a mapping without Device never takes a device another mapping names --------------------------------
# pin-io names nbd0 and pin-nl names nbd2, both with no server (they look free, as at a boot with the server down);
# any-io (Ioctl) and any-nl (Netlink) have no Device and must take neither, nor the same one.
claims_log=/tmp/claims.log
echo "nbd-daemon (pin-io on nbd0 and pin-nl on nbd2 with no server; any-io and any-nl without Device)" > $claims_log
nbd-daemon --Nbd:Mappings:0:Name=pin-io --Nbd:Mappings:0:Uri=nbd://127.0.0.1:10899/none --Nbd:Mappings:0:Device=/dev/nbd0 \
    --Nbd:Mappings:1:Name=any-io --Nbd:Mappings:1:Uri=nbd://127.0.0.1:$PORT_KIT/kit \
    --Nbd:Mappings:2:Name=pin-nl --Nbd:Mappings:2:Uri=nbd://127.0.0.1:10899/none --Nbd:Mappings:2:Device=/dev/nbd2 \
    --Nbd:Mappings:2:Interface=Netlink \
    --Nbd:Mappings:3:Name=any-nl --Nbd:Mappings:3:Uri=nbd://127.0.0.1:$PORT_SRV/srv --Nbd:Mappings:3:Interface=Netlink \
    >>$claims_log 2>&1 &
CLAIMS=$!
connected_list() { for d in /sys/block/nbd*; do [ -e "$d/pid" ] && printf '%s,' "${d##*/}"; done; }
claims_t0=$(now_ms)
while [ "$(connected_list | tr ',' '\n' | grep -c nbd)" -lt 2 ] && [ $(( $(now_ms) - claims_t0 )) -lt 60000 ] \
    && ! proc_gone $CLAIMS; do
    sleep 0.2
done
sleep 1
claims_connected=$(connected_list)
any_io=$(grep -o 'Mapping any-io on /dev/nbd[0-9]*' $claims_log | tail -n 1 | sed 's/.* //')
any_nl=$(grep -o 'Mapping any-nl on /dev/nbd[0-9]*' $claims_log | tail -n 1 | sed 's/.* //')
daemon_kill $CLAIMS TERM
result claims connected=${claims_connected:-none} any_io=${any_io:-none} any_nl=${any_nl:-none} exit_rc=$EXIT_RC
grep -v '^   at ' $claims_log | grep -m 12 'any-\|pin-' | sed 's/^/LOG claims: /'

# --- stallstop: SIGTERM while the server has stopped reading under write load (Ioctl) --------------------------
# The driver sends NBD_CMD_DISC under the socket's send lock, which a request send blocked on the full socket holds
# for up to Timeout (30 s); the disconnect must cut that short, so that the stop ends well within systemd's
# TimeoutStopSec and the device is freed.
stall_log=/tmp/stall.log
kit_daemon stall /dev/nbd7 $stall_log Ioctl mapping on /dev/nbd7, nbdkit SIGSTOPped under write load, then SIGTERM
STALL=$DPID
wait_connected nbd7 60 $STALL >/dev/null; stall_ok=$(yesno $?)
# The first open after the connect scans partitions (a read): done before the stall, or it would be the only request.
dd if=/dev/nbd7 of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null
kill -STOP "$(cat /run/nbdkit.pid)"
# one 16 MiB O_DIRECT write: split into 128 KiB requests sent at once, more than the socket buffers hold
dd if=/dev/zero of=/dev/nbd7 bs=16M count=1 oflag=direct 2>/dev/null &
WRITER=$!
# bytes waiting in our socket's send queue towards nbdkit (the kernel's connection; hex tx_queue in /proc/net/tcp)
stall_unsent=0 stall_t0=$(now_ms)
while [ "$stall_unsent" = 0 ] && [ $(( $(now_ms) - stall_t0 )) -lt 10000 ]; do
    sleep 0.5
    for q in $(awk 'NR > 1 && $3 ~ /:2A3A$/ && $4 == "01" { split($5, q, ":"); print q[1] }' /proc/net/tcp); do
        [ $((0x$q)) -gt "$stall_unsent" ] && stall_unsent=$((0x$q))
    done
done
sleep 1
echo "SCENARIO $(date +%H:%M:%S) SIGTERM sent" >> $stall_log
kill -TERM $STALL
wait_exit $STALL 40 || { kill -KILL $STALL; wait $STALL; }
stall_rc=$EXIT_RC stall_ms=$EXIT_MS
stall_freed=$(wait_free nbd7 5 >/dev/null; yesno $?)
kill -CONT "$(cat /run/nbdkit.pid)"
kill $WRITER 2>/dev/null; wait $WRITER 2>/dev/null
result stallstop connected=$stall_ok send_queue=${stall_unsent:-none} exit_rc=$stall_rc exit_ms=$stall_ms freed=$stall_freed
grep -v '^   at ' $stall_log | tail -n 8 | sed 's/^/LOG stall: /'

# --- twin: the same mapping in a second daemon started by hand beside the one running it (Netlink) ---------------
# The second process must touch neither server nor device (it would adopt the device by its backend identifier),
# name the first one's pid, and its Ctrl-C must leave the first one's device serving.
twin_log=/tmp/twin.log twin2_log=/tmp/twin2.log
# A fresh nbdkit: after stallstop (SIGSTOP, the daemon's shutdown of its socket, SIGCONT) it refused connections in a
# run. Whether that one still lived (not exited, nor a zombie), for the record.
kit_alive=$(proc_gone "$(cat /run/nbdkit.pid)" && echo no || echo yes)
kill -KILL "$(cat /run/nbdkit.pid)" 2>/dev/null
sleep 0.5
start_kit || note "nbdkit restart failed"
KIT_IFACE=Netlink kit_daemon twin /dev/nbd4 $twin_log Netlink mapping on /dev/nbd4, the first process
TWIN=$DPID
wait_connected nbd4 60 $TWIN >/dev/null; twin_ok=$(yesno $?)
twin_conns_before=$(awk 'NR > 1 && $3 ~ /:2A3A$/ && $4 == "01"' /proc/net/tcp | wc -l)
KIT_IFACE=Netlink kit_daemon twin /dev/nbd4 $twin2_log the same mapping started again by hand, the second process
TWIN2=$DPID
twin_t0=$(now_ms)
while [ "$(grep -c 'Reconnecting; mapping is run by another nbd-daemon process' $twin2_log)" -lt 2 ] && [ $(( $(now_ms) - twin_t0 )) -lt 60000 ] \
    && ! proc_gone $TWIN2; do
    sleep 0.2
done
twin_refusals=$(grep -c 'Reconnecting; mapping is run by another nbd-daemon process' $twin2_log)
twin_holder=$(grep -o 'another nbd-daemon process (pid [0-9]*)' $twin2_log | head -n 1 | tr -dc 0-9)
twin_conns=$(awk 'NR > 1 && $3 ~ /:2A3A$/ && $4 == "01"' /proc/net/tcp | wc -l)
daemon_kill $TWIN2 TERM   # as the admin's Ctrl-C (SIGINT is ignored in a background job of a script)
twin2_rc=$EXIT_RC
sleep 1
twin_after=$([ -e /sys/block/nbd4/pid ] && [ "$(nbd_bytes nbd4)" != 0 ] && echo yes || echo no)
twin_backend=$(cat /sys/block/nbd4/backend 2>/dev/null)
twin_read=$(probe_read nbd4 twin && echo ok || echo "fail_$PROBE_ERR")
twin_lost=$(grep -c -- '-> Reconnecting' $twin_log)
daemon_kill $TWIN TERM
result twin kit_was_alive=$kit_alive connected=$twin_ok first_pid=$TWIN refusals=$twin_refusals holder=${twin_holder:-none} \
    conns_before=$twin_conns_before conns_during=$twin_conns second_rc=$twin2_rc connected_after=$twin_after \
    backend=${twin_backend:-none} read=$twin_read first_lost=$twin_lost exit_rc=$EXIT_RC
grep -v '^   at ' $twin_log | grep -m 12 'twin' | sed 's/^/LOG twin: /'
grep -v '^   at ' $twin2_log | grep -m 6 'twin' | sed 's/^/LOG twin2: /'

# --- busypick: a Netlink mapping without Device, and the device it would pick is open elsewhere ------------------
# pin names nbd0 (no server), so pick chooses the device itself. nbd1, open in this shell without a configuration,
# looks free in sysfs, but the driver gave it a configuration on open: NBD_CMD_CONNECT to it fails EBUSY. The next
# attempt must choose another device, not nbd1 again (the kernel's own choice skips such a device).
pick_log=/tmp/pick.log
echo "nbd-daemon (pin on nbd0 with no server; pick without Device while nbd1 is open in the shell)" > $pick_log
exec 8</dev/nbd1
nbd-daemon --Nbd:Mappings:0:Name=pin --Nbd:Mappings:0:Uri=nbd://127.0.0.1:10899/none --Nbd:Mappings:0:Device=/dev/nbd0 \
    --Nbd:Mappings:0:Interface=Netlink \
    --Nbd:Mappings:1:Name=pick --Nbd:Mappings:1:Uri=nbd://127.0.0.1:$PORT_KIT/kit --Nbd:Mappings:1:Interface=Netlink \
    --Nbd:Mappings:1:Reconnect:InitialDelay=00:00:01 --Nbd:Mappings:1:Reconnect:MaxDelay=00:00:01 >>$pick_log 2>&1 &
PICK=$!
pick_t0=$(now_ms)
while ! grep -q 'Mapping pick on /dev/nbd[0-9]* .*-> Serving' $pick_log && [ $(( $(now_ms) - pick_t0 )) -lt 30000 ] \
    && ! proc_gone $PICK; do
    sleep 0.2
done
pick_ms=$(( $(now_ms) - pick_t0 ))
pick_dev=$(grep -o 'Mapping pick on /dev/nbd[0-9]* .*-> Serving' $pick_log | tail -n 1 | grep -o '/dev/nbd[0-9]*' | head -n 1)
pick_busy=$(grep -c 'pick .*Reconnecting;.*EBUSY' $pick_log)
pick_read=$( [ -n "$pick_dev" ] && probe_read "${pick_dev#/dev/}" pick && echo ok || echo fail)
exec 8<&-
daemon_kill $PICK TERM
result busypick device=${pick_dev:-none} busy_refusals=$pick_busy serving_after_ms=$pick_ms read=$pick_read exit_rc=$EXIT_RC
grep -v '^   at ' $pick_log | grep -m 8 'pick' | sed 's/^/LOG pick: /'

# --- maxreq: a server announcing (NBD_INFO_BLOCK_SIZE) and enforcing a maximum request below the driver's -----------
# nbdkit's blocksize-policy filter: at most 64 KiB per request, larger ones refused (EINVAL). The driver's requests go up
# to 128 KiB (queue/max_sectors_kb), so a 1 MiB O_DIRECT write fails with an I/O error unless the daemon capped the
# device at the server's maximum. One Ioctl mapping (nbd6) and one Netlink mapping (nbd7).
PORT_MAX=10813
truncate -s 16M /tmp/maxreq.img
nbdkit -i 127.0.0.1 -p $PORT_MAX -P /run/nbdkit-max.pid --filter=blocksize-policy file /tmp/maxreq.img \
    blocksize-maximum=64K blocksize-error-policy=error && wait_port $PORT_MAX 10 || note "nbdkit (blocksize-policy) did not start"
max_log=/tmp/maxreq.log
# A marker in the kernel log: a count of lines would stop growing once the ring buffer is full.
echo "nbdvm: maxreq step starts" > /dev/kmsg
echo "nbd-daemon (io on nbd6 Ioctl, nl on nbd7 Netlink, server maximum 64 KiB)" > $max_log
before6=$(cat /sys/block/nbd6/queue/max_sectors_kb) before7=$(cat /sys/block/nbd7/queue/max_sectors_kb)
nbd-daemon --Nbd:Mappings:0:Name=io --Nbd:Mappings:0:Uri=nbd://127.0.0.1:$PORT_MAX/io --Nbd:Mappings:0:Device=/dev/nbd6 \
    --Nbd:Mappings:0:Interface=Ioctl \
    --Nbd:Mappings:1:Name=nl --Nbd:Mappings:1:Uri=nbd://127.0.0.1:$PORT_MAX/nl --Nbd:Mappings:1:Device=/dev/nbd7 \
    --Nbd:Mappings:1:Interface=Netlink >>$max_log 2>&1 &
MAXD=$!
max_t0=$(now_ms)
while [ "$(grep -c -- '-> Serving' $max_log)" -lt 2 ] && [ $(( $(now_ms) - max_t0 )) -lt 60000 ] && ! proc_gone $MAXD; do
    sleep 0.2
done
for dev in nbd6 nbd7; do
    head -c $((2 * MiB)) /dev/urandom > /tmp/max-data
    timeout 60 dd if=/tmp/max-data of=/dev/$dev bs=1M oflag=direct 2>/tmp/max-err; wrc=$?
    timeout 60 dd if=/dev/$dev of=/tmp/max-back bs=1M count=2 iflag=direct 2>>/tmp/max-err; rrc=$?
    same=$([ "$(sha_file /tmp/max-data)" = "$(sha_file /tmp/max-back)" ] && echo yes || echo no)
    result maxreq device=$dev before_kb=$([ $dev = nbd6 ] && echo $before6 || echo $before7) \
        max_sectors_kb=$(cat /sys/block/$dev/queue/max_sectors_kb) write_rc=$wrc read_rc=$rrc readback=$same \
        said_capped=$(grep -q "on /dev/$dev: requests capped at 64 KiB" $max_log && echo yes || echo no)
    sed "s/^/LOG maxreq-$dev: /" /tmp/max-err | head -n 3
done
# This step's kernel lines only (stallstop used nbd7 before, with errors of its own).
dmesg | sed -n '/nbdvm: maxreq step starts/,$p' > /tmp/maxreq-kmsg
result maxreq_kernel marker=$(grep -c 'nbdvm: maxreq step starts' /tmp/maxreq-kmsg) io_errors=$(grep -c 'I/O error' /tmp/maxreq-kmsg)
grep 'nbd[67]' /tmp/maxreq-kmsg | head -n 5 | sed 's/^/LOG maxreq-kernel: /'
daemon_kill $MAXD TERM
# Stopped (OnStop=Disconnect), the devices get back the limit they had: their next user must not inherit this server's.
result maxreq_after_stop nbd6_kb=$(cat /sys/block/nbd6/queue/max_sectors_kb) nbd7_kb=$(cat /sys/block/nbd7/queue/max_sectors_kb) \
    before6_kb=$before6 before7_kb=$before7 said_restored=$(grep -c 'device given up, queue/max_sectors_kb back to' $max_log)
kill "$(cat /run/nbdkit-max.pid)" 2>/dev/null
grep -v '^   at ' $max_log | grep -m 10 'capped\|could not be capped\|Serving\|back to' | sed 's/^/LOG maxreq: /'

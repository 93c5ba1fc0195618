# A silent network partition (no FIN, no RST) of IDLE netlink connections, on the real driver (issue 6: "detect a
# dead link promptly"). One nbdkit file export, one daemon, two netlink mappings to it:
#   probe    /dev/nbd0  KeepAlive=KEEPALIVE_S (TCP keepalive on the sockets the kernel takes)
#   control  /dev/nbd1  KeepAlive=0 (off): nothing ever travels on an idle connection, so nothing can notice
# A known pattern is written to both, then they sit idle; the VM's loopback drops every packet for PARTITION_S
# (tc netem loss 100% on lo, lib.sh lo_partition) and is healed. Measured:
#   partition_tool  the partition itself: a TCP connect to nbdkit answers before, not during, again after
#   detect          ms from partition start until probe left Serving (daemon log), what the transition said, when
#                   and with which errno the kernel's receive loop failed (dmesg "Receive control failed", uptime
#                   clock; -110 ETIMEDOUT is the keepalive), whether control left Serving during the partition
#   heal            ms from heal until probe was Serving again (RECONFIGURE hand-over "kernel took N of M sockets")
#   held_read       a 1 MiB O_DIRECT read on probe issued after its death, during the partition: held by the kernel,
#                   completes after heal with the right data
#   final           data read back on both devices after heal, kernel "I/O error" lines for nbd0/nbd1
. /usr/local/lib/nbdvm.sh
MiB=1048576
PORT=10830
IMG=/tmp/silent.img
TIMEOUT_S=5
KEEPALIVE_S=6
PARTITION_S=15
IDLE_S=2
truncate -s 32M $IMG

have() { command -v "$1" >/dev/null && echo yes || echo no; }
netem=yes; load_module sch_netem || netem=no
result tools nbdkit=$(have nbdkit) daemon=$(have nbd-daemon) tc=$([ -x "$LO_TC" ] && echo yes || echo no) netem=$netem

nbdkit -f -i 127.0.0.1 -p $PORT file $IMG >/tmp/kit.log 2>&1 &
KIT=$!
wait_port $PORT 20 || note "nbdkit did not start"

# --- the partition on its own, before any daemon connection exists ----------------------------------------
before=$(tcp_answers $PORT 2)
lo_partition; prc=$?
qdisc=$(lo_qdisc | awk '{ print $2 }')
during=$(tcp_answers $PORT 3)
lo_heal; hrc=$?
after=$(tcp_answers $PORT 2)
result partition_tool before=$before during=$during after=$after partition_rc=$prc heal_rc=$hrc qdisc=${qdisc:-none}

# --- daemon with the two mappings ----------------------------------------------------------------------------
mkdir -p /etc/nbd-daemon
cat > /etc/nbd-daemon/appsettings.json <<EOF
{ "Nbd": { "Mappings": [
  { "Name": "probe", "Uri": "nbd://127.0.0.1:$PORT/", "Device": "/dev/nbd0", "Interface": "Netlink",
    "Timeout": "00:00:0$TIMEOUT_S", "KeepAlive": "00:00:0$KEEPALIVE_S" },
  { "Name": "control", "Uri": "nbd://127.0.0.1:$PORT/", "Device": "/dev/nbd1", "Interface": "Netlink",
    "Timeout": "00:00:0$TIMEOUT_S", "KeepAlive": "00:00:00" }
] } }
EOF
LOG=/tmp/daemon.log
nbd-daemon >$LOG 2>&1 &
DPID=$!

# count_re LOG ERE / wait_re LOG ERE N TIMEOUT_S: lines matching ERE; wait until there are at least N (prints ms).
count_re() { grep -cE "$2" "$1"; }
wait_re() {
    local t0 limit=$(( $4 * 1000 )); t0=$(now_ms)
    while :; do
        [ "$(count_re "$1" "$2")" -ge "$3" ] && { echo $(( $(now_ms) - t0 )); return 0; }
        [ $(( $(now_ms) - t0 )) -ge "$limit" ] && { echo $(( $(now_ms) - t0 )); return 1; }
        proc_gone $DPID && { echo $(( $(now_ms) - t0 )); return 1; }
        sleep 0.05
    done
}
PROBE_SERVING='Mapping probe on /dev/nbd0 .*-> Serving'
PROBE_LEFT='Mapping probe on /dev/nbd0 .*Serving -> '
CONTROL_LEFT='Mapping control on /dev/nbd1 .*Serving -> '
PROBE_TOOK='Mapping probe on /dev/nbd0: NBD_CMD_RECONFIGURE: kernel took'

c0=$(wait_connected nbd0 90 $DPID); ok0=$(yesno $?)
c1=$(wait_connected nbd1 90 $DPID); ok1=$(yesno $?)
wait_re $LOG "$PROBE_SERVING" 1 30 >/dev/null
wait_re $LOG 'Mapping control on /dev/nbd1 .*-> Serving' 1 30 >/dev/null

# patterns: probe MiB 0 and 1 (1 is read during the partition), control MiB 8
head -c $MiB /dev/urandom > /tmp/pat-p0
head -c $MiB /dev/urandom > /tmp/pat-p1
head -c $MiB /dev/urandom > /tmp/pat-c
w=0
dd if=/tmp/pat-p0 of=/dev/nbd0 bs=1M seek=0 oflag=direct 2>/dev/null || w=1
dd if=/tmp/pat-p1 of=/dev/nbd0 bs=1M seek=1 oflag=direct 2>/dev/null || w=1
dd if=/tmp/pat-c of=/dev/nbd1 bs=1M seek=8 oflag=direct 2>/dev/null || w=1
result setup connected_probe=$ok0 connected_control=$ok1 connect_ms=$c0/$c1 write_rc=$w \
    keepalive_s=$KEEPALIVE_S timeout_s=$TIMEOUT_S partition_s=$PARTITION_S idle_s=$IDLE_S daemon_alive=$(proc_gone $DPID && echo no || echo yes)

# --- idle, then the silent partition ------------------------------------------------------------------------------
sleep $IDLE_S
probe_left_before=$(count_re $LOG "$PROBE_LEFT")
control_left_before=$(count_re $LOG "$CONTROL_LEFT")
t_part=$(now_ms)
lo_partition
left_ms=$(wait_re $LOG "$PROBE_LEFT" $((probe_left_before + 1)) $PARTITION_S); detected=$(yesno $?)
t_detect=$(now_ms)
# what the Serving -> Reconnecting transition gave as its reason: "connection lost (LINK_DEAD[; socket ...])" when
# the kernel's event came first, "connection lost (socket 1 of 1: connection error)" when the daemon's own watch
# of its duplicate of the socket did (POLLERR: the keepalive timeout)
detail=$(grep -E "$PROBE_LEFT" $LOG | tail -n 1 | sed -n 's/.*Serving -> [A-Za-z]*; \(.*\); attempt .*/\1/p')
case "$detail" in
    "connection lost (LINK_DEAD"*) by=LINK_DEAD ;;
    "connection lost (socket "*) by=socket_watch ;;
    "") by=none ;;
    *) by=other ;;
esac

# a read on probe after its death, while the partition lasts: the kernel must hold it, not fail it
held_issued=no
rm -f /tmp/held.rc /tmp/held.out
if [ "$detected" = yes ]; then
    ( timeout 200 dd if=/dev/nbd0 of=/tmp/held.out bs=1M skip=1 count=1 iflag=direct 2>/tmp/held.err
      echo "$? $(now_ms)" > /tmp/held.rc ) &
    HELD=$!
    held_issued=yes
fi

remaining=$(( t_part + PARTITION_S * 1000 - $(now_ms) ))
[ "$remaining" -gt 0 ] && sleep "$(awk -v ms=$remaining 'BEGIN { printf "%.2f", ms / 1000 }')"
control_left=$(( $(count_re $LOG "$CONTROL_LEFT") - control_left_before ))
held_done_before_heal=$([ -f /tmp/held.rc ] && echo yes || echo no)
control_pid_during=$([ -e /sys/block/nbd1/pid ] && echo present || echo absent)
# counted before the heal: the probe may reconnect within ~100 ms of it, before the detect lines below are done
serving_before=$(count_re $LOG "$PROBE_SERVING")
took_before=$(count_re $LOG "$PROBE_TOOK")
t_heal=$(now_ms)
lo_heal

# kernel side: the receive loop's failure (printk time is the same clock as /proc/uptime)
kdead() { # DEV: ms after the partition of the first "Receive control failed" for DEV, or none
    dmesg | grep "$1: Receive control failed" | head -n 1 | sed -n 's/^\[ *\([0-9.]*\)\].*(result \(-*[0-9]*\)).*/\1 \2/p' \
        | awk -v t=$t_part '{ printf "%d:%s\n", $1 * 1000 - t, $2 }'
}
kp=$(kdead nbd0); kc=$(kdead nbd1)
[ -n "$kp" ] || kp=none:none
result detect detected=$detected probe_left_ms=$left_ms detected_by=$by detail=$(echo "${detail:-none}" | tr ' ' '_') \
    kernel_dead_ms=${kp%%:*} kernel_errno=${kp#*:} control_left=$control_left \
    control_kernel_dead=$([ -n "$kc" ] && echo yes || echo no) control_pid=$control_pid_during \
    ignored_link_dead=$(grep -c 'LINK_DEAD for an earlier connection ignored' $LOG)

# --- heal ---------------------------------------------------------------------------------------------------
t_wait=$(now_ms)
sv_ms=$(wait_re $LOG "$PROBE_SERVING" $((serving_before + 1)) 30); back=$(yesno $?)
sv_ms=$(( sv_ms + t_wait - t_heal ))   # from the heal, not from here
wait_re $LOG "$PROBE_TOOK" $((took_before + 1)) 10 >/dev/null
set -- $(grep -F "$PROBE_TOOK" $LOG | tail -n 1 | sed -n 's/.*kernel took \([0-9]*\) of \([0-9]*\) sockets.*/\1 \2/p')
# all the attempts made during the partition (each a connect timing out after Timeout, then 250 ms)
attempts=$(grep -cE 'Mapping probe on /dev/nbd0 .*-> Reconnecting' $LOG)
result heal serving_again=$back serving_after_heal_ms=$sv_ms taken=${1:-none} total=${2:-none} \
    reconnecting_logged=$attempts detect_to_heal_ms=$(( t_heal - t_detect ))

if [ "$held_issued" = yes ]; then
    wait $HELD
    read -r hrc hend < /tmp/held.rc
    hmatch=mismatch; cmp -s /tmp/held.out /tmp/pat-p1 && hmatch=match
    [ "$hrc" = 0 ] || sed 's/^/LOG held: /' /tmp/held.err
    result held_read issued=yes done_before_heal=$held_done_before_heal read_rc=$hrc readback=$hmatch \
        done_after_heal_ms=$(( hend - t_heal )) issued_after_partition_ms=$(( t_detect - t_part ))
else
    result held_read issued=no done_before_heal=none read_rc=none readback=none done_after_heal_ms=none
fi

# --- data on both devices, errors, state -----------------------------------------------------------------------
rb() { # DEV SKIP_MIB PATTERN
    if timeout 120 dd if=/dev/$1 of=/tmp/rb.out bs=1M skip=$2 count=1 iflag=direct 2>/dev/null && cmp -s /tmp/rb.out $3; then
        echo match
    else
        echo mismatch
    fi
}
p0=$(rb nbd0 0 /tmp/pat-p0); p1=$(rb nbd0 1 /tmp/pat-p1); cc=$(rb nbd1 8 /tmp/pat-c)
result final probe_readback=$p0 probe_held_region=$p1 control_readback=$cc \
    io_errors=$(dmesg | grep 'I/O error' | grep -c 'nbd[01]') io_errors_all=$(dmesg | grep -c 'I/O error') \
    control_left_total=$(( $(count_re $LOG "$CONTROL_LEFT") - control_left_before )) \
    probe_pid=$([ -e /sys/block/nbd0/pid ] && echo present || echo absent) \
    control_pid=$([ -e /sys/block/nbd1/pid ] && echo present || echo absent) \
    daemon_alive=$(proc_gone $DPID && echo no || echo yes)

dmesg | grep 'nbd[01]' | sed 's/^/KLOG /' | tail -n 20
grep -v '^   at \|^   --- End\|^ ---> ' $LOG | sed 's/^/LOG daemon: /' | tail -n 60
kill -TERM $DPID
wait_exit $DPID 20 || { kill -KILL $DPID; wait $DPID; }
kill -KILL $KIT 2>/dev/null

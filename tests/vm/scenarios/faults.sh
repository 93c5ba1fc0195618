# Fault injection under a continuous write-then-verify load (nbd-verify), on daemon mappings, one boot:
#  S1  nbdkit SIGKILLed, restarted after 1..5 s (varies per round), ROUNDS_S1 times in a row
#  S2  nbdkit SIGSTOPped for Timeout + 2 s, then SIGCONT
#  S3  fault-proxy between daemon and nbdkit: cut, reset, stall 2 s, stall Timeout + 2 s (one round = all four)
#  S4  nbdkit comes back with a different export size for 4 s (refused, device not resized), then the right one
#  S5  the daemon SIGKILLed under load and started again 2 s later; then nbdkit SIGKILLed once (1 s) to prove the
#      new daemon really runs the mapping (Netlink: it adopted the device the dead one left serving)
#  S6  Netlink only: the daemon stopped (SIGTERM) with OnStop=Leave and started again 2 s later; then the same
#      nbdkit kill as S5
#  S7  nbdkit stopped gracefully (SIGTERM: what it reads meanwhile is answered NBD_ESHUTDOWN), restarted after 1 s
# for Interface=Netlink (nbd0 direct, nbd1 through the proxy) and Interface=Ioctl (nbd2 direct, nbd3 proxied),
# all four mappings in one daemon configured through /etc/nbd-daemon/appsettings.json.
#
# Each nbdkit is one process (-f), so SIGKILL really drops the connection (nbd-server forks per client).
# Server-back time T (CLOCK_REALTIME, `nbd-verify now` / `waitport`): S1/S4 the restarted port accepts, S2 SIGCONT,
# S3 the cut/reset command or the stall's resume. Stall after back = the longest completion gap of the verifier
# that ends after T and starts before the round's end, counted from max(start, T).
#
# Counts: ROUNDS_S1 ROUNDS_S2 ROUNDS_S3 ROUNDS_S4, and the mappings' request Timeout TIMEOUT_S (1..9 s), overridden by
# /etc/nbd-faults.conf (tests/vm/faults.sh --full / --timeout S).
# RELAY=1 (/etc/nbd-faults.conf, tests/vm/faults.sh --relay; or the first line of a copy) sets "Relay": true on every
# mapping: the kernel gets one end of a socketpair and the daemon relays to the server, resending what was in flight
# when it reconnects by itself.
# Prints per case: RESULT fault scenario=S? interface=... relay=0|1 ...; per round: NOTE fault-round ...
. /usr/local/lib/nbdvm.sh
ROUNDS_S1=3 ROUNDS_S2=1 ROUNDS_S3=1 ROUNDS_S4=1 ROUNDS_S5=1 ROUNDS_S6=1 ROUNDS_S7=3 REGION_MIB=32
SCENARIOS="S1 S2 S3 S4 S5 S6 S7" INTERFACES="Netlink Ioctl"
TIMEOUT_S=5
[ -f /etc/nbd-faults.conf ] && . /etc/nbd-faults.conf
# not in the defaults line above: a copy of this script may set it on its first line (tests/Vm.Tests FaultRelayTests)
[ "${RELAY:-0}" = 1 ] && RELAY=1 || RELAY=0
MiB=1048576
SIZE_MIB=64 WRONG_MIB=48
PROXY_BIN=fault-proxy

have() { command -v "$1" >/dev/null && echo yes || echo no; }
result faults-tools nbdkit=$(have nbdkit) daemon=$(have nbd-daemon) nbd_verify=$(have nbd-verify) \
    fault_proxy=$(have fault-proxy)

# mapping index i (0..3): device nbd$i; kit port 10800+i; the proxied ones (1, 3) listen on 10900+i.
iface_of() { case $1 in 0|1) echo Netlink ;; *) echo Ioctl ;; esac; }
kit_port() { echo $((10800 + $1)); }
uri_port() { case $1 in 1|3) echo $((10900 + $1)) ;; *) kit_port "$1" ;; esac; }

# start_kit I [FILE]: nbdkit in the foreground (one process), backgrounded here; pid in /run/kit-I.pid.
start_kit() {
    local i=$1 f=${2:-/tmp/exp-$1.img}
    nbdkit -f -i 127.0.0.1 -p "$(kit_port "$i")" file "$f" >>/tmp/kit-$i.log 2>&1 &
    echo $! > /run/kit-$i.pid
}
kit_pid() { cat /run/kit-$1.pid; }

for i in 0 1 2 3; do
    truncate -s ${SIZE_MIB}M /tmp/exp-$i.img
    start_kit $i
done
truncate -s ${WRONG_MIB}M /tmp/wrong.img
for i in 0 1 2 3; do wait_port "$(kit_port $i)" 20 || note "nbdkit $i did not start"; done
for i in 1 3; do
    fault-proxy $((10900 + i)) "$(kit_port $i)" /run/proxy-$i.ctl >>/tmp/proxy-$i.log 2>&1 &
    echo $! > /run/proxy-$i.pid
    wait_port $((10900 + i)) 10 || note "fault-proxy $i did not start"
done

write_config() {
    local i sep="" dead relay=""
    # absent rather than false without RELAY: the configuration a daemon without the key accepts
    [ "$RELAY" = 1 ] && relay=' "Relay": true,'
    mkdir -p /etc/nbd-daemon
    {
        echo '{ "Nbd": { "Mappings": ['
        for i in 0 1 2 3; do
            dead=""
            # With the relay the driver holds I/O through the daemon's whole cold start at a restart (S5/S6: up to
            # 56 s measured under TCG on a loaded host), so those runs get the default 2 minutes, not 1.
            [ "$(iface_of $i)" = Netlink ] && dead="\"DeadConnectionTimeout\": \"00:0$([ "$RELAY" = 1 ] && echo 2 || echo 1):00\", \"OnStop\": \"Leave\","
            echo "$sep{ \"Name\": \"m$i\", \"Uri\": \"nbd://127.0.0.1:$(uri_port $i)/kit\", \"Device\": \"/dev/nbd$i\","
            echo "  \"Interface\": \"$(iface_of $i)\", \"Timeout\": \"00:00:0$TIMEOUT_S\",$relay $dead"
            echo "  \"Reconnect\": { \"InitialDelay\": \"00:00:00.250\", \"MaxDelay\": \"00:00:01\" } }"
            sep=","
        done
        echo '] } }'
    } > /etc/nbd-daemon/appsettings.json
}
DLOG=/tmp/daemon.log
start_daemon() {
    echo "SCENARIO $(date +%H:%M:%S) daemon start" >> $DLOG
    nbd-daemon >>$DLOG 2>&1 &
    DAEMON=$!
}
write_config
start_daemon
for i in 0 1 2 3; do
    ms=$(wait_connected nbd$i 90 $DAEMON) || note "nbd$i not connected after ${ms} ms"
done
result faults-start daemon_alive=$(proc_gone $DAEMON && echo no || echo yes) \
    sizes=$(nbd_bytes nbd0),$(nbd_bytes nbd1),$(nbd_bytes nbd2),$(nbd_bytes nbd3)

kio_count() { dmesg | grep -c 'I/O error'; }
knbd_count() { dmesg | grep -c 'nbd[0-9]'; }


# --- one fault round: sets T (server back) after injecting; the caller's case function does the fault -----
round_done() { # CASE_TAG ROUND EXTRA...: waits for service after T (SERVE_LIMIT s), settles 1 s, prints the round's NOTE
    local tag=$1 r=$2 end; shift 2
    wait_served "$ST" "$T" "${SERVE_LIMIT:-60}"
    [ "$SERVED" = yes ] || ALL_SERVED=no
    [ "$SERVED" = yes ] && SERVED_ROUNDS=$((SERVED_ROUNDS + 1))
    sleep 1
    end=$(nbd-verify now)
    local stall errs
    stall=$(stall_after "$EV" "$T" "$end")
    errs=$(count_between "$EV" error "$T0" "$end")
    [ "$stall" -gt "$MAX_STALL" ] && MAX_STALL=$stall
    note fault-round $tag round=$r "$@" served_again=$SERVED first_ok_after_back_ms=$SERVED_MS \
        stall_after_back_ms=$stall app_io_errors=$errs
}

# fault_S1 I ROUND: SIGKILL nbdkit, restart after 1..5 s
fault_S1() {
    local i=$1 r=$2 down=$(( ($2 - 1) % 5 + 1 ))
    T0=$(nbd-verify now)
    kill -KILL "$(kit_pid $i)"; wait "$(kit_pid $i)" 2>/dev/null
    sleep $down
    start_kit $i
    T=$(nbd-verify waitport "$(kit_port $i)" 20) || T=$(nbd-verify now)
    round_done "$TAG" "$r" down_s=$down
}

# fault_S7 I ROUND: SIGTERM nbdkit (it answers what it reads until it exits with NBD_ESHUTDOWN), restart after 1 s
fault_S7() {
    local i=$1 r=$2 pid
    pid=$(kit_pid $i)
    T0=$(nbd-verify now)
    kill -TERM "$pid"; wait "$pid" 2>/dev/null
    sleep 1
    start_kit $i
    T=$(nbd-verify waitport "$(kit_port $i)" 20) || T=$(nbd-verify now)
    round_done "$TAG" "$r" down_s=1
}

# fault_S2 I ROUND: SIGSTOP for Timeout + 2 s, SIGCONT
fault_S2() {
    local i=$1 r=$2 down=$((TIMEOUT_S + 2))
    T0=$(nbd-verify now)
    kill -STOP "$(kit_pid $i)"
    sleep $down
    kill -CONT "$(kit_pid $i)"
    T=$(nbd-verify now)
    round_done "$TAG" "$r" stopped_s=$down
}

# fault_S3 I ROUND: cut, reset, stall 2 s, stall Timeout + 2 s through the proxy of mapping I
proxy_cmd() { echo "$2" > /run/proxy-$1.ctl; }
fault_S3() {
    local i=$1 r=$2 mode s
    for mode in cut reset stall2 stall$((TIMEOUT_S + 2)); do
        T0=$(nbd-verify now)
        case $mode in
            cut|reset) proxy_cmd $i $mode; T=$(nbd-verify now) ;;
            stall*) s=${mode#stall}; proxy_cmd $i stall; sleep "$s"; proxy_cmd $i resume; T=$(nbd-verify now) ;;
        esac
        round_done "$TAG" "$r" fault=$mode
        sleep 1
    done
}

# fault_S4 I ROUND: nbdkit back with a 48 MiB export for 4 s, then the right one
fault_S4() {
    local i=$1 r=$2 lines0 during
    lines0=$(grep -c "export size changed from $((SIZE_MIB * MiB)) to $((WRONG_MIB * MiB))" $DLOG)
    T0=$(nbd-verify now)
    kill -KILL "$(kit_pid $i)"; wait "$(kit_pid $i)" 2>/dev/null
    start_kit $i /tmp/wrong.img
    nbd-verify waitport "$(kit_port $i)" 20 >/dev/null
    sleep 4
    during=$(nbd_bytes nbd$i)
    S4_REFUSED=$(( $(grep -c "export size changed from $((SIZE_MIB * MiB)) to $((WRONG_MIB * MiB))" $DLOG) - lines0 ))
    [ "$during" = "$((WRONG_MIB * MiB))" ] && S4_RESIZED=yes
    S4_DURING="$S4_DURING$during,"
    kill -KILL "$(kit_pid $i)"; wait "$(kit_pid $i)" 2>/dev/null
    start_kit $i
    T=$(nbd-verify waitport "$(kit_port $i)" 20) || T=$(nbd-verify now)
    round_done "$TAG" "$r" wrong_size=$((WRONG_MIB * MiB)) size_during=$during refusals_logged=$S4_REFUSED
}

# daemon_restart SIGNAL I ROUND: stops the daemon with SIGNAL, starts it again 2 s later (T = the start), waits
# until the verifier is served after T; then one nbdkit SIGKILL + restart after 1 s (T = its port back), served
# again through the new daemon. Sets RESTART_ADOPTED (Netlink: the new daemon logged that it adopted nbdI).
daemon_restart() {
    local sig=$1 i=$2 r=$3 a0 left
    a0=$(grep -c "adopted /dev/nbd$i " $DLOG)
    T0=$(nbd-verify now)
    echo "SCENARIO $(date +%H:%M:%S) daemon SIG$sig" >> $DLOG
    kill -$sig $DAEMON
    wait_exit $DAEMON 20 || { kill -KILL $DAEMON; wait $DAEMON; }
    left=$([ -e /sys/block/nbd$i/pid ] && echo configured || echo free)
    sleep 2
    local dl0; dl0=$(wc -l < $DLOG)
    start_daemon
    T=$(nbd-verify now)
    # a daemon's cold start took up to 56 s on a loaded host (TCG): wait well past that, and past the relay's 120 s
    # DeadConnectionTimeout, before calling it not served or not adopted
    SERVE_LIMIT=150 round_done "$TAG" "$r" step=daemon-$sig device_while_down=$left
    # With the relay the driver has no server socket while no daemon runs: where the new daemon's start spends its time
    [ "$RELAY" = 1 ] && note fault-restart $TAG round=$r $(restart_timeline m$i "$dl0" "$T")
    # adoption is logged once the new daemon runs the mapping (Netlink); Ioctl configures the device anew
    local until_ms=$(( $(now_ms) + 150000 ))
    while [ "$(now_ms)" -lt "$until_ms" ]; do
        [ "$(grep -c "adopted /dev/nbd$i " $DLOG)" -gt "$a0" ] && break
        [ "$(iface_of $i)" = Ioctl ] && [ -e /sys/block/nbd$i/pid ] && break
        sleep 0.1
    done
    RESTART_ADOPTED=$([ "$(grep -c "adopted /dev/nbd$i " $DLOG)" -gt "$a0" ] && echo yes || echo no)
    RESTART_LEFT="$RESTART_LEFT$left,"
    T0=$(nbd-verify now)
    kill -KILL "$(kit_pid $i)"; wait "$(kit_pid $i)" 2>/dev/null
    sleep 1
    start_kit $i
    T=$(nbd-verify waitport "$(kit_port $i)" 20) || T=$(nbd-verify now)
    round_done "$TAG" "$r" step=server-kill-after-restart adopted=$RESTART_ADOPTED
}
fault_S5() { daemon_restart KILL "$@"; }
fault_S6() { daemon_restart TERM "$@"; }

# relay_figures MAPPING LINE0: what the relay of MAPPING logged after line LINE0 of the daemon log (events 110-113):
# connections lost, reconnects, requests resent in all, the longest outage it hid, and give-ups.
relay_figures() {
    tail -n +$(($2 + 1)) $DLOG | grep "Mapping $1 on " | awk '
        /relay lost the server connection/ { lost++ }
        /relay reconnected after/ { back++; for (i = 1; i < NF; i++) {
            if ($i == "after" && $(i + 1) + 0 > out) out = $(i + 1) + 0
            if ($(i + 1) == "requests" && $(i + 2) == "resent") resent += $i } }
        /relay ended \(GaveUp/ { gave++ }
        /relay lost the server connection \(the server is shutting down: NBD_ESHUTDOWN/ { esh++ }
        END { printf "relay_lost=%d relay_reconnected=%d relay_resent=%d relay_max_outage_ms=%d relay_gave_up=%d relay_eshutdown=%d\n",
            lost, back, resent, out, gave, esh }'
}

# restart_timeline MAPPING LINE0 T: ms from the daemon's start T (nbd-verify now) to its first log line, to MAPPING
# leaving Idle, and to MAPPING Serving, from the daemon log after line LINE0 (its HH:MM:SS.mmm stamps, same clock).
restart_timeline() {
    tail -n +$(($2 + 1)) $DLOG | awk -v m="Mapping $1 " -v T="$3" '
        function ms(stamp,    p) { split(stamp, p, ":"); return (p[1] * 3600 + p[2] * 60 + p[3]) * 1000 }
        BEGIN { t0 = (T % 86400) * 1000; first = conn = serv = -1 }
        $1 ~ /^[0-9][0-9]:[0-9][0-9]:[0-9][0-9]\.[0-9]+$/ {
            t = ms($1) - t0
            if (first < 0 || t < first) first = t
            if (conn < 0 && index($0, m) && index($0, "Idle -> Connecting")) conn = t
            if (serv < 0 && index($0, m) && index($0, "-> Serving")) serv = t
        }
        END { printf "first_log_ms=%d idle_to_connecting_ms=%d serving_ms=%d\n", first, conn, serv }'
}

# run_case SCENARIO INTERFACE: the verifier on the mapping's device through all rounds of one scenario.
run_case() {
    local sc=$1 iface=$2 i rounds reopen="" k0 n0 vpid report
    case $iface in Netlink) i=0 ;; *) i=2; reopen=--reopen-on-error ;; esac
    [ "$sc" = S3 ] && i=$((i + 1))
    eval "rounds=\$ROUNDS_$sc"
    TAG="scenario=$sc interface=$iface"
    EV=/tmp/ev-$sc-$iface ST=/tmp/st-$sc-$iface
    local stop=/tmp/stop-$sc-$iface size0
    rm -f "$EV" "$ST" "$stop"
    size0=$(nbd_bytes nbd$i)
    k0=$(kio_count); n0=$(knbd_count)
    echo "SCENARIO $(date +%H:%M:%S) case $sc $iface on nbd$i" >> $DLOG
    local dl0; dl0=$(wc -l < $DLOG)
    nbd-verify run --device /dev/nbd$i --region-mib $REGION_MIB --seed $((i + 7)) --stop-file "$stop" \
        --events "$EV" --status "$ST" $reopen > /tmp/report-$sc-$iface 2>/tmp/verr-$sc-$iface &
    vpid=$!
    sleep 2
    MAX_STALL=0 ALL_SERVED=yes SERVED_ROUNDS=0 S4_DURING="" S4_RESIZED=no S4_REFUSED=0 RESTART_ADOPTED=n/a RESTART_LEFT=
    local r=1
    while [ $r -le "$rounds" ]; do
        "fault_$sc" $i $r
        r=$((r + 1))
    done
    touch "$stop"
    wait_exit $vpid 180 || { kill -KILL $vpid; note "verifier $sc $iface did not finish"; }
    report=$(cat /tmp/report-$sc-$iface)
    local we re fe oe vf vr vff fc mg wr rd dir
    we=$(echo " $report" | sed -n 's/.* write_errors=\([0-9]*\).*/\1/p')
    re=$(echo " $report" | sed -n 's/.* read_errors=\([0-9]*\).*/\1/p')
    fe=$(echo " $report" | sed -n 's/.* final_read_errors=\([0-9]*\).*/\1/p')
    oe=$(echo " $report" | sed -n 's/.* open_errors=\([0-9]*\).*/\1/p')
    vf=$(echo " $report" | sed -n 's/.* verify_failures=\([0-9]*\).*/\1/p')
    vr=$(echo " $report" | sed -n 's/.* verify_failures_recent=\([0-9]*\).*/\1/p')
    vff=$(echo " $report" | sed -n 's/.* verify_failures_final=\([0-9]*\).*/\1/p')
    fc=$(echo " $report" | sed -n 's/.* final_checked=\([0-9]*\).*/\1/p')
    mg=$(echo " $report" | sed -n 's/.* max_gap_ms=\([0-9]*\).*/\1/p')
    wr=$(echo " $report" | sed -n 's/.* writes=\([0-9]*\).*/\1/p')
    rd=$(echo " $report" | sed -n 's/.* reads=\([0-9]*\).*/\1/p')
    dir=$(echo " $report" | sed -n 's/.* direct=\([a-z]*\).*/\1/p')
    local extra=""
    [ "$sc" = S4 ] && extra="wrong_size=$((WRONG_MIB * MiB)) sizes_during=${S4_DURING%,} resized_to_wrong=$S4_RESIZED refusals_logged=$S4_REFUSED"
    case $sc in S5|S6) extra="adopted=$RESTART_ADOPTED device_while_down=${RESTART_LEFT%,}" ;; esac
    [ "$RELAY" = 1 ] && extra="$extra $(relay_figures m$i $dl0)"
    result fault scenario=$sc interface=$iface relay=$RELAY device=nbd$i rounds=$rounds \
        app_io_errors=$(( ${we:-0} + ${re:-0} + ${fe:-0} + ${oe:-0} )) write_errors=${we:--1} read_errors=${re:--1} \
        final_read_errors=${fe:--1} open_errors=${oe:--1} \
        kernel_io_errors=$(( $(kio_count) - k0 )) kernel_nbd_lines=$(( $(knbd_count) - n0 )) \
        verify_failures=${vf:--1} verify_failures_recent=${vr:--1} verify_failures_final=${vff:--1} final_checked=${fc:--1} \
        max_stall_after_back_ms=$MAX_STALL max_gap_ms=${mg:--1} served_again=$ALL_SERVED served_rounds=$SERVED_ROUNDS \
        writes=${wr:--1} reads=${rd:--1} direct=${dir:-unknown} size_before=$size0 size_after=$(nbd_bytes nbd$i) \
        daemon_alive=$(proc_gone $DAEMON && echo no || echo yes) timeout_s=$TIMEOUT_S $extra
    sed "s/^/LOG verifier-stderr: /" /tmp/verr-$sc-$iface | head -n 5
    grep -v '^gap\|^verify_fail' "$EV" | head -n 8 | sed "s/^/LOG events-$sc-$iface: /"
    grep '^verify_fail' "$EV" | head -n 12 | sed "s/^/LOG events-$sc-$iface: /"
    grep '^gap' "$EV" | sort -t= -k4 -n -r | head -n 5 | sed "s/^/LOG gaps-$sc-$iface: /"
}

for sc in $SCENARIOS; do
    for iface in $INTERFACES; do
        # OnStop=Leave is Netlink only (an ioctl device lives only as long as the daemon's NBD_DO_IT thread)
        [ "$sc" = S6 ] && [ "$iface" = Ioctl ] && continue
        run_case "$sc" "$iface"
    done
done

dmesg | grep 'nbd[0-9]' | tail -n 30 | sed 's/^/LOG dmesg: /'
grep -v '^   at \|^   --- End\|^ ---> ' $DLOG | tail -n 120 | sed 's/^/LOG daemon: /'
for i in 1 3; do tail -n 20 /tmp/proxy-$i.log | sed "s/^/LOG proxy-$i: /"; done
daemon_kill $DAEMON TERM
result faults-stop exit_rc=$EXIT_RC

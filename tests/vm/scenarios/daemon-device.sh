# Scenarios 2-4 in one boot, for --interface ioctl and netlink:
#  geometry  sysfs size and logical_block_size for block sizes 512/1024/4096, on a 64 MiB export and on one of
#            10 MiB + 1000 bytes (the host-side test computes what is expected from export_bytes and bs);
#  readonly  --read-only refuses writes; check/disconnect exit codes; the device is free after disconnect, and the
#            `connect` process notices (exit code, time from `disconnect`, "disconnected elsewhere");
#  autodev   connect without DEVICE picks an unused device while nbd0 is busy;
#  stop      SIGTERM / SIGINT / SIGHUP (the terminal closed) to `connect` (started with SIGINT at its default
#            disposition, as from a terminal) frees the device; exit code and timings;
#  idle      CPU ticks of a mapped, idle `connect` over 10 s (and its busiest thread);
#  fullout   `connect` with standard output on /dev/full: the "connected" line fails, and the device must not stay
#            configured with nobody serving it;
#  lost      the server SIGKILLed under a `connect`: it must notice, exit 1 and free the device (the kernel keeps a
#            netlink device whose connection died configured, every request failing, until someone disconnects it);
#  doitsig   (ioctl) signals the process catches, sent to the very thread blocked in NBD_DO_IT (tgkill, our
#            thread-signal tool): the driver shuts the sockets down when that wait is interrupted, so the device must
#            keep serving only if that thread never takes a signal.
#  stopcont  `connect` stopped (SIGSTOP) for 1 s and continued, as a debugger or `strace -p` attaching does: a stop
#            cannot be blocked, and it interrupts NBD_DO_IT's wait too (ioctl); netlink has no such wait.
. /usr/local/lib/nbdvm.sh
MiB=1048576
truncate -s 64M /tmp/even.img
truncate -s $((10 * MiB + 1000)) /tmp/odd.img
start_nbd_server 10809 even /tmp/even.img odd /tmp/odd.img || note "nbd-server did not start"
wait_handshake 10809
URI=nbd://127.0.0.1:10809

connected_devices() {
    for d in /sys/block/nbd*; do [ "$(cat $d/size)" != 0 ] && basename "$d"; done
}

geometry() { # MODE: nbd0..nbd5, two mappings at a time (the even and the odd export of one block size).
    # Six `connect`s at once made some miss the daemon's 10 s connect/handshake timeout under TCG on a loaded
    # host: six .NET start-ups shared two vCPUs. Two at a time gives each start-up a vCPU.
    local mode=$1 n=0 bs exp first pid
    for bs in 512 1024 4096; do
        first=$n
        for exp in even odd; do
            daemon_connect /tmp/geo-$mode-$n.log "$URI/$exp" /dev/nbd$n --interface "$mode" --block-size $bs
            eval "pid$n=$DPID exp$n=$exp"
            n=$((n + 1))
        done
        for i in $first $((first + 1)); do
            eval "pid=\$pid$i exp=\$exp$i"
            cms=$(wait_connected nbd$i 60 "$pid"); ok=$(yesno $?)
            result geometry mode=$mode bs=$bs export=$exp export_bytes=$(stat -c %s /tmp/$exp.img) connected=$ok \
                size=$(nbd_bytes nbd$i) lbs=$(nbd_lbs nbd$i) connect_ms=$cms
            [ "$ok" = yes ] || show_log /tmp/geo-$mode-$i.log
        done
        for i in $first $((first + 1)); do eval "kill -TERM \$pid$i 2>/dev/null"; done
        for i in $first $((first + 1)); do
            eval "pid=\$pid$i"
            wait_exit "$pid" 15 || { kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }
            wait_free nbd$i 5 >/dev/null
        done
    done
}

readonly_and_check() { # MODE
    local mode=$1 log=/tmp/ro-$mode.log
    daemon_connect "$log" "$URI/even" /dev/nbd0 --interface "$mode" --read-only
    local rpid=$DPID
    cms=$(wait_connected nbd0 30 "$rpid"); ok=$(yesno $?)
    ro=$(cat /sys/block/nbd0/ro)
    head -c $MiB /dev/urandom > /tmp/ro-data
    timeout 30 dd if=/tmp/ro-data of=/dev/nbd0 bs=1M count=1 oflag=direct 2>/tmp/ro-err; wrc=$?
    err=other
    grep -qi 'read-only' /tmp/ro-err && err=EROFS
    grep -qi 'not permitted' /tmp/ro-err && err=EPERM
    sed 's/^/LOG ro-dd: /' /tmp/ro-err
    timeout 30 dd if=/dev/nbd0 of=/dev/null bs=1M count=1 iflag=direct 2>/dev/null; rrc=$?
    nbd-daemon check /dev/nbd0 >/tmp/check.out 2>&1; crc_on=$?
    sed 's/^/LOG check: /' /tmp/check.out
    timeout 30 nbd-daemon disconnect /dev/nbd0 >/tmp/disc.out 2>&1; drc=$?
    t1=$(now_ms)
    sed 's/^/LOG disconnect: /' /tmp/disc.out
    fms=$(wait_free nbd0 5); freed=$(yesno $?)
    wait_exit "$rpid" 10 || { kill -KILL "$rpid" 2>/dev/null; wait "$rpid"; }
    # From the end of `disconnect` (its own .NET start-up is not `connect`'s to answer for) to the end of `connect`:
    # the netlink `connect` waits on its socket's end, then reads sysfs until the configuration is gone.
    xms=$(( $(now_ms) - t1 ))
    said=$(grep -q 'disconnected elsewhere' "$log" && echo yes || echo no)
    nbd-daemon check /dev/nbd0 >/dev/null 2>&1; crc_off=$?
    nbd-daemon check /dev/nbd9 >/dev/null 2>&1; crc_unused=$?
    result readonly mode=$mode connected=$ok sysfs_ro=$ro write_rc=$wrc write_error=$err read_rc=$rrc \
        check_connected_rc=$crc_on disconnect_rc=$drc freed=$freed free_ms=$fms connect_exit_rc=$EXIT_RC \
        connect_exit_ms=$xms said_elsewhere=$said \
        check_after_rc=$crc_off check_unused_rc=$crc_unused size_after=$(nbd_bytes nbd0) \
        pid_after=$([ -e /sys/block/nbd0/pid ] && echo present || echo absent)
    [ "$ok" = yes ] && [ "$said" = yes ] || show_log "$log"
}

autodevice() { # MODE: nbd0 held by a first mapping, a second connect without DEVICE must pick another one
    local mode=$1
    daemon_connect /tmp/auto-a-$mode.log "$URI/even" /dev/nbd0 --interface "$mode"
    local apid=$DPID
    wait_connected nbd0 30 "$apid" >/dev/null; aok=$(yesno $?)
    before=$(connected_devices | tr '\n' ' ')
    daemon_connect /tmp/auto-b-$mode.log "$URI/odd" --interface "$mode"
    local bpid=$DPID n=600 dev=""
    while [ $n -gt 0 ] && ! proc_gone "$bpid"; do
        for d in $(connected_devices); do case " $before " in *" $d "*) ;; *) dev=$d ;; esac; done
        [ -n "$dev" ] && break
        sleep 0.05; n=$((n - 1))
    done
    bsize=0; [ -n "$dev" ] && bsize=$(nbd_bytes "$dev")
    daemon_kill "$bpid" TERM; brc=$EXIT_RC
    bfreed=no; [ -n "$dev" ] && wait_free "$dev" 5 >/dev/null && bfreed=yes
    nbd0_still=$( [ "$(cat /sys/block/nbd0/size)" != 0 ] && echo yes || echo no)
    daemon_kill "$apid" TERM
    wait_free nbd0 5 >/dev/null
    result autodev mode=$mode first_connected=$aok busy_before="$(echo $before | tr ' ' ',')" picked=${dev:-none} \
        picked_size=$bsize nbd0_still_connected=$nbd0_still second_exit_rc=$brc picked_freed=$bfreed
    [ -n "$dev" ] || { show_log /tmp/auto-a-$mode.log; show_log /tmp/auto-b-$mode.log; }
}

# sigint_ignored PID: yes when SIGINT is in the process's SigIgn mask (bit 1).
sigint_ignored() {
    local hex
    hex=$(sed -n 's/^SigIgn:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null)
    [ -n "$hex" ] || { echo unknown; return; }
    [ $(( 0x$hex & 2 )) != 0 ] && echo yes || echo no
}

stop() { # MODE SIGNAL
    local mode=$1 sig=$2 log=/tmp/stop-$1-$2.log
    # A non-interactive shell starts background jobs with SIGINT ignored (POSIX), and a process keeps an inherited
    # SIG_IGN; a terminal's Ctrl-C reaches a foreground process whose SIGINT is at its default. gnu-env (the host's
    # GNU env, put in the image by run-vm.sh) restores that default before exec, so the daemon sees what it would
    # see in a terminal. Used for SIGTERM too, so both signals start the same way.
    echo "gnu-env --default-signal=INT nbd-daemon connect $URI/even /dev/nbd0 --interface $mode" > "$log"
    gnu-env --default-signal=INT nbd-daemon connect "$URI/even" /dev/nbd0 --interface "$mode" >>"$log" 2>&1 &
    local spid=$!
    wait_connected nbd0 30 "$spid" >/dev/null; ok=$(yesno $?)
    ign=$(sigint_ignored "$spid")
    t0=$(now_ms)
    kill "-$sig" "$spid" 2>/dev/null
    wait_free nbd0 10 >/dev/null; freed=$(yesno $?)
    fms=$(( $(now_ms) - t0 ))
    if ! wait_exit "$spid" 15; then kill -KILL "$spid" 2>/dev/null; wait "$spid"; fi
    ems=$(( $(now_ms) - t0 ))
    result stop mode=$mode signal=$sig connected=$ok sigint_ignored=$ign freed=$freed free_ms=$fms exit_rc=$EXIT_RC \
        exit_ms=$ems size_after=$(nbd_bytes nbd0) pid_after=$([ -e /sys/block/nbd0/pid ] && echo present || echo absent)
    [ "$ok" = yes ] && [ "$EXIT_RC" = 0 ] || show_log "$log"
}

# cpu_ticks PID: user + system clock ticks (USER_HZ, 100/s) of all PID's threads so far. The comm field is cut off
# first: .NET names threads with spaces (".NET TP Worker"), which would shift the fields.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $12 + $13 }'; }

# busiest_thread PID BEFORE_FILE: "name:ticks" of the thread that used most CPU since BEFORE_FILE was written by
# thread_ticks (names with spaces get underscores so the RESULT line stays one key=value per word).
thread_ticks() {
    local t
    for t in /proc/$1/task/*; do
        echo "${t##*/} $(sed 's/^.*) //' "$t/stat" 2>/dev/null | awk '{ print $12 + $13 }') $(tr ' ' _ < "$t/comm" 2>/dev/null)"
    done
}
busiest_thread() {
    thread_ticks "$1" | awk -v before="$2" '
        BEGIN { while ((getline l < before) > 0) { split(l, f, " "); b[f[1]] = f[2] } }
        { d = $2 - b[$1]; if (d > best) { best = d; name = $3 } }
        END { printf "%s:%d\n", (name == "" ? "none" : name), best }'
}

idle_cpu() { # MODE: CPU used by a mapped, idle `connect` over 10 s, after the same 3 s settle bench.sh gives
    local mode=$1 log=/tmp/idle-$1.log
    daemon_connect "$log" "$URI/even" /dev/nbd0 --interface "$mode"
    local ipid=$DPID
    wait_connected nbd0 30 "$ipid" >/dev/null; ok=$(yesno $?)
    sleep 3
    a=$(cpu_ticks "$ipid"); thread_ticks "$ipid" > /tmp/idle-threads-$mode
    sleep 10
    b=$(cpu_ticks "$ipid"); busiest=$(busiest_thread "$ipid" /tmp/idle-threads-$mode)
    still=$( [ "$(cat /sys/block/nbd0/size)" != 0 ] && echo yes || echo no)
    daemon_kill "$ipid" TERM
    wait_free nbd0 5 >/dev/null; freed=$(yesno $?)
    result idle mode=$mode connected=$ok still_connected=$still ticks_before=${a:-none} ticks_after=${b:-none} \
        idle_cpu_ms=$(( (${b:-0} - ${a:-0}) * 10 )) busiest_thread=$busiest exit_rc=$EXIT_RC freed=$freed
    [ "$ok" = yes ] || show_log "$log"
}

# kill_cmdline TEXT: SIGKILL every process whose command line contains TEXT (nbd-server forks one per connection).
kill_cmdline() {
    local c
    for c in /proc/[0-9]*/cmdline; do
        tr '\0' ' ' < "$c" 2>/dev/null | grep -q -- "$1" && kill -KILL "$(basename "$(dirname "$c")")" 2>/dev/null
    done
}

lost() { # MODE
    local mode=$1 log=/tmp/lost-$1.log port=10812
    start_nbd_server $port lost /tmp/even.img || note "nbd-server on $port did not start"
    wait_handshake $port
    echo "nbdvm: lost $mode starts" > /dev/kmsg
    daemon_connect "$log" "nbd://127.0.0.1:$port/lost" /dev/nbd0 --interface "$mode"
    local lpid=$DPID
    wait_connected nbd0 30 "$lpid" >/dev/null; ok=$(yesno $?)
    kill_cmdline "nbd-server-$port.conf"
    t0=$(now_ms)
    wait_exit "$lpid" 30 || { kill -KILL "$lpid" 2>/dev/null; wait "$lpid" 2>/dev/null; }
    ems=$(( $(now_ms) - t0 ))
    wait_free nbd0 10 >/dev/null; freed=$(yesno $?)
    said=$(grep -q 'was lost\|service loop ended' "$log" && echo yes || echo no)
    # The kernel's lines for this step: the disconnect of a device whose socket is dead ("Send disconnect failed").
    dmesg | sed -n "/nbdvm: lost $mode starts/,\$p" > /tmp/lost-kmsg
    grep 'nbd0' /tmp/lost-kmsg | head -n 6 | sed "s/^/LOG lost-$mode-kernel: /"
    result lost mode=$mode connected=$ok exit_rc=$EXIT_RC exit_ms=$ems freed=$freed said_lost=$said \
        size_after=$(nbd_bytes nbd0) pid_after=$([ -e /sys/block/nbd0/pid ] && echo present || echo absent) \
        kernel_marker=$(grep -c "nbdvm: lost $mode starts" /tmp/lost-kmsg) kernel_nbd0_lines=$(grep -c 'nbd0' /tmp/lost-kmsg) \
        kernel_disconnect_failed=$(grep -c 'Send disconnect failed' /tmp/lost-kmsg) kernel_io_errors=$(grep -c 'I/O error' /tmp/lost-kmsg)
    show_log "$log"
    # Nothing left configured for the next mode, whatever this build did.
    nbd-daemon disconnect /dev/nbd0 >/dev/null 2>&1
    wait_free nbd0 10 >/dev/null
}

full_stdout() { # MODE
    local mode=$1 log=/tmp/fullout-$1.log
    echo "nbd-daemon connect $URI/even /dev/nbd0 --interface $mode >/dev/full" > "$log"
    nbd-daemon connect "$URI/even" /dev/nbd0 --interface "$mode" 2>>"$log" >/dev/full &
    local fpid=$!
    t0=$(now_ms)
    wait_exit "$fpid" 30 || { kill -KILL "$fpid" 2>/dev/null; wait "$fpid" 2>/dev/null; }
    ems=$(( $(now_ms) - t0 ))
    wait_free nbd0 10 >/dev/null; freed=$(yesno $?)
    said=$(grep -q 'standard output' "$log" && echo yes || echo no)
    result fullout mode=$mode exit_rc=$EXIT_RC exit_ms=$ems freed=$freed said_stdout=$said \
        size_after=$(nbd_bytes nbd0) pid_after=$([ -e /sys/block/nbd0/pid ] && echo present || echo absent)
    show_log "$log"
    nbd-daemon disconnect /dev/nbd0 >/dev/null 2>&1
    wait_free nbd0 10 >/dev/null
}

# caught_of PID SIGNAL...: the given signals that PID catches (its SigCgt mask), comma-separated, or "none".
caught_of() {
    local pid=$1 hex sig list=
    shift
    hex=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$pid/status" 2>/dev/null)
    for sig in "$@"; do
        [ -n "$hex" ] && [ $(( (0x$hex >> (sig - 1)) & 1 )) = 1 ] && list=$list${list:+,}$sig
    done
    echo "${list:-none}"
}

doit_signal() {
    local log=/tmp/doitsig.log
    echo "nbdvm: doitsig starts" > /dev/kmsg
    daemon_connect "$log" "$URI/even" /dev/nbd0 --interface ioctl
    local spid=$DPID
    wait_connected nbd0 30 "$spid" >/dev/null; ok=$(yesno $?)
    local tid
    tid=$(cat /sys/block/nbd0/pid 2>/dev/null)
    # Signals whose default is to be ignored, so one the process does not catch changes nothing: SIGCHLD, SIGURG,
    # SIGCONT, SIGWINCH. Only the caught ones can interrupt the thread's wait.
    caught=$(caught_of "$spid" 17 18 23 28)
    sent=$(thread-signal "$spid" "${tid:-0}" 17 18 23 28 2>&1); src=$?
    echo "$sent" | sed 's/^/LOG doitsig-sent: /'
    sleep 2
    alive=$(kill -0 "$spid" 2>/dev/null && echo yes || echo no)
    pid_now=$(cat /sys/block/nbd0/pid 2>/dev/null || echo absent)
    timeout 30 dd if=/dev/nbd0 of=/tmp/doitsig-back bs=1M count=4 skip=8 iflag=direct 2>/tmp/doitsig-err; rrc=$?
    rbytes=$(wc -c < /tmp/doitsig-back 2>/dev/null || echo 0)
    dmesg | sed -n '/nbdvm: doitsig starts/,$p' > /tmp/doitsig-kmsg
    grep 'nbd0' /tmp/doitsig-kmsg | head -n 6 | sed 's/^/LOG doitsig-kernel: /'
    daemon_kill "$spid" TERM
    wait_free nbd0 10 >/dev/null; freed=$(yesno $?)
    result doitsig connected=$ok doit_tid=${tid:-none} caught=$caught tgkill_rc=$src alive=$alive \
        pid_after_signals=$pid_now read_rc=$rrc read_bytes=$rbytes kernel_marker=$(grep -c 'nbdvm: doitsig starts' /tmp/doitsig-kmsg) \
        kernel_nbd0_lines=$(grep -c 'nbd0' /tmp/doitsig-kmsg) exit_rc=$EXIT_RC freed=$freed
    [ "$ok" = yes ] && [ "$rrc" = 0 ] || { show_log "$log"; sed 's/^/LOG doitsig-dd: /' /tmp/doitsig-err; }
    nbd-daemon disconnect /dev/nbd0 >/dev/null 2>&1
    wait_free nbd0 10 >/dev/null
}

stop_cont() { # MODE
    local mode=$1 log=/tmp/stopcont-$1.log
    echo "nbdvm: stopcont $mode starts" > /dev/kmsg
    daemon_connect "$log" "$URI/even" /dev/nbd0 --interface "$mode"
    local spid=$DPID
    wait_connected nbd0 30 "$spid" >/dev/null; ok=$(yesno $?)
    kill -STOP "$spid"; sleep 1; kill -CONT "$spid"; sleep 2
    alive=$(kill -0 "$spid" 2>/dev/null && echo yes || echo no)
    rm -f /tmp/stopcont-back
    timeout 30 dd if=/dev/nbd0 of=/tmp/stopcont-back bs=1M count=4 skip=8 iflag=direct 2>/dev/null; rrc=$?
    rbytes=$(wc -c < /tmp/stopcont-back 2>/dev/null || echo 0)
    dmesg | sed -n "/nbdvm: stopcont $mode starts/,\$p" > /tmp/stopcont-kmsg
    grep 'nbd0' /tmp/stopcont-kmsg | head -n 6 | sed "s/^/LOG stopcont-$mode-kernel: /"
    said=$(grep -q 'service loop ended\|was lost' "$log" && echo yes || echo no)
    said_interrupted=$(grep -q 'service loop ended (interrupted: the process was stopped, traced or frozen' "$log" && echo yes || echo no)
    [ "$alive" = yes ] && daemon_kill "$spid" TERM || { wait_exit "$spid" 15 || { kill -KILL "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; }; }
    wait_free nbd0 10 >/dev/null; freed=$(yesno $?)
    result stopcont mode=$mode connected=$ok alive=$alive read_rc=$rrc read_bytes=$rbytes said_ended=$said said_interrupted=$said_interrupted \
        kernel_marker=$(grep -c "nbdvm: stopcont $mode starts" /tmp/stopcont-kmsg) \
        kernel_shutting_down=$(grep -c 'shutting down sockets' /tmp/stopcont-kmsg) \
        kernel_io_errors=$(grep -c 'I/O error' /tmp/stopcont-kmsg) exit_rc=$EXIT_RC freed=$freed
    show_log "$log"
    nbd-daemon disconnect /dev/nbd0 >/dev/null 2>&1
    wait_free nbd0 10 >/dev/null
}

doit_signal
stop_cont ioctl
stop_cont netlink
for mode in ioctl netlink; do
    geometry $mode
    readonly_and_check $mode
    autodevice $mode
    stop $mode TERM
    stop $mode INT
    stop $mode HUP
    idle_cpu $mode
    full_stdout $mode
    lost $mode
done

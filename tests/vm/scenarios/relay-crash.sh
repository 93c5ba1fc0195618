# The crash-proof relay's journal on the real driver (tests/Vm.Tests/RelayCrashTests.cs): a relay process is SIGKILLed
# under a write-then-verify load and a successor recovers from the journal, RELAY_CRASH_KILLS times (default 10).
# tests/Nbd.RelayChild in "keep" mode plays what would outlive the daemon (systemd's file descriptor store and the
# kernel): it holds our end of the pair, the driver's end and the journal's memfd, configures /dev/nbd0 with the
# driver's end (ioctl, Timeout 30 s), and starts relay processes ("relay" mode) on duplicates of them, each doing its
# own handshake with nbd-server. No daemon, no systemd: this proves the relay's half on the driver. nbd-verify writes
# and verifies (O_DIRECT 4 KiB blocks over 32 MiB) the whole time.
# RESULT relay-crash-keeper kills= refused= in_flight_at_kill= with_pending= cut_replies= answered_behind= restart_ms_max= stopped=
# RESULT relay-crash app_io_errors= kernel_io_errors= kernel_nbd_lines= verify_failures= max_gap_ms= writes= reads= direct=
. /usr/local/lib/nbdvm.sh
RELAY_CRASH_KILLS=${RELAY_CRASH_KILLS:-10}
truncate -s 64M /tmp/disk.img
start_nbd_server 10809 disk /tmp/disk.img || { result relay-crash error=nbd-server-start; exit 1; }
k0=$(dmesg | grep -c 'I/O error'); n0=$(dmesg | grep -c 'nbd[0-9]')
/opt/Nbd.RelayChild/Nbd.RelayChild keep /dev/nbd0 nbd://127.0.0.1:10809/disk "$RELAY_CRASH_KILLS" /tmp/kills-done /tmp/finish > /tmp/keeper.log 2>&1 &
keeper=$!
wait_path /tmp/kills-done.ready 120 || { show_log /tmp/keeper.log; result relay-crash error=keeper-not-ready; exit 1; }
nbd-verify run --device /dev/nbd0 --region-mib 32 --seed 11 --stop-file /tmp/verify-stop --gap-ms 300 \
    --events /tmp/verify.events --status /tmp/verify.status > /tmp/verify.report 2>/tmp/verify.err &
vpid=$!
wait_path /tmp/kills-done $((RELAY_CRASH_KILLS * 60 + 60)) || note "relay-crash: the keeper did not finish its kills"
sleep 2
touch /tmp/verify-stop
wait_exit $vpid 180 || { kill -KILL $vpid; note "relay-crash: the verifier did not finish"; }
touch /tmp/finish
wait_exit $keeper 60 || { kill -KILL $keeper; note "relay-crash: the keeper did not finish"; }
grep -v '^RESULT' /tmp/keeper.log | sed 's/^NOTE //' | sed 's/^/NOTE /' | head -n 60
grep '^RESULT' /tmp/keeper.log
report=" $(cat /tmp/verify.report)"
field() { echo "$report" | sed -n "s/.* $1=\([0-9a-z]*\).*/\1/p"; }
we=$(field write_errors); re=$(field read_errors); fe=$(field final_read_errors); oe=$(field open_errors)
result relay-crash app_io_errors=$(( ${we:-0} + ${re:-0} + ${fe:-0} + ${oe:-0} )) \
    kernel_io_errors=$(( $(dmesg | grep -c 'I/O error') - k0 )) kernel_nbd_lines=$(( $(dmesg | grep -c 'nbd[0-9]') - n0 )) \
    verify_failures=$(field verify_failures) verify_failures_final=$(field verify_failures_final) \
    final_checked=$(field final_checked) max_gap_ms=$(field max_gap_ms) writes=$(field writes) reads=$(field reads) \
    direct=$(field direct) report_lines=$(wc -l < /tmp/verify.report)
sed 's/^/LOG verifier-stderr: /' /tmp/verify.err | head -n 5
grep '^gap' /tmp/verify.events | sort -t= -k4 -n -r | head -n 5 | sed 's/^/LOG gaps: /'
grep -v '^gap' /tmp/verify.events | head -n 10 | sed 's/^/LOG events: /'
dmesg | grep 'nbd[0-9]' | tail -n 20 | sed 's/^/DMESG /'

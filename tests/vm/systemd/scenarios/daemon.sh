#!/bin/bash
# Full-tier scenario, run inside the VM by vm-scenario.service once multi-user is reached.
# Prints "RESULT systemd <key>=<value>" lines; the xunit fixture parses them. Every step is bounded by `timeout`
# so a hung daemon costs seconds, not the whole run. Sections:
#   boot_*      how long the boot took
#   harness_*   a stand-in Type=notify unit (systemd-notify + logger --journald): proves READY, STATUS and
#               journald native fields work in this image, independent of the daemon
#   server_*    nbd-server / nbdkit memory (64 KiB maximum request) / qemu-nbd on loopback
#   client_*    nbd-client (ioctl mode) against the same servers: the baseline for I/O and RSS
#   daemon3_*, daemon1_*, daemon16_*   nbd-daemon under systemd with 3, 1 and 16 mappings (daemon3_hup_*: a SIGHUP
#               to the running daemon is ignored with a warning)
#   crashloop_*  every start failing for 15 s: the unit keeps restarting, then recovers by itself
set -u
r() { echo "RESULT systemd $1=$2"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
prop() { systemctl show -p "$2" --value "$1" 2>/dev/null; }
mark() { r "t_$1_s" "$(cut -d' ' -f1 /proc/uptime)"; }

r boot_uptime_s "$(cut -d' ' -f1 /proc/uptime)"
r systemd_version "$(systemctl --version | head -n1 | awk '{print $2}')"
r kernel "$(uname -r)"

# Read-back through a block device with direct I/O: 4 MiB of random data, written, read, compared.
roundtrip() { # DEVICE TAG -> ok | write-failed | read-failed | mismatch
    local dev=$1 tag=$2
    dd if=/dev/urandom of="/tmp/pat.$tag" bs=1M count=4 status=none
    timeout 30 dd if="/tmp/pat.$tag" of="$dev" bs=1M oflag=direct conv=fsync status=none 2>/dev/null || { echo write-failed; return; }
    timeout 30 dd if="$dev" of="/tmp/back.$tag" bs=1M count=4 iflag=direct status=none 2>/dev/null || { echo read-failed; return; }
    cmp -s "/tmp/pat.$tag" "/tmp/back.$tag" && echo ok || echo mismatch
}
dev_size() { cat "/sys/block/$(basename "$1")/size" 2>/dev/null || echo missing; }
dev_pid() { [ -e "/sys/block/$(basename "$1")/pid" ] && echo present || echo absent; }
# Who serves a device: the kernel's pid file names the thread in NBD_DO_IT; it must be one of the daemon's.
dev_owner() { # DEVICE MAINPID -> daemon | other:<tid> | none
    local f="/sys/block/$(basename "$1")/pid" tid
    [ -e "$f" ] || { echo none; return; }
    tid=$(cat "$f")
    if [ "${2:-0}" -gt 0 ] && [ -d "/proc/$2/task/$tid" ]; then echo daemon; else echo "other:$tid"; fi
}
wait_port() { # PORT: until something listens on 127.0.0.1:PORT (10 s)
    local i
    for i in $(seq 1 100); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.1; done
    return 1
}

# ---------------------------------------------------------------- harness: a stand-in Type=notify service
mark harness
cat >/run/systemd/system/harness-notify.service <<'UNIT'
[Unit]
Description=Harness stand-in for a Type=notify daemon

[Service]
Type=notify
NotifyAccess=all
ExecStart=/bin/sh -c 'printf "MESSAGE=harness mapping up\nMAPPING=harness\nPRIORITY=6\n" | logger --journald; sleep 1; systemd-notify --ready --status="Harness: 1 mapping ready"; exec sleep infinity'
UNIT
systemctl daemon-reload
t0=$(now_ms); timeout 30 systemctl start harness-notify.service; rc=$?; t1=$(now_ms)
r harness_start_rc "$rc"
r harness_start_ms "$((t1 - t0))"
for p in StatusText ActiveState SubState MainPID; do r "harness_$p" "$(prop harness-notify "$p")"; done
journalctl --sync 2>/dev/null
r harness_journal_field_count "$(journalctl --no-pager -o json MAPPING=harness | grep -c '"MAPPING":"harness"')"
r harness_journal_unit_field_count "$(journalctl --no-pager -o json -u harness-notify MAPPING=harness | grep -c '"MAPPING":"harness"')"
timeout 30 systemctl stop harness-notify.service; r harness_stop_rc "$?"
r harness_after_stop_ActiveState "$(prop harness-notify ActiveState)"

# ---------------------------------------------------------------- servers on loopback
mark servers
modprobe nbd; r nbd_module "$( [ -d /sys/module/nbd ] && echo loaded || echo missing )"
r nbd_devices "$(ls -d /sys/block/nbd* 2>/dev/null | wc -l)"
mkdir -p /srv/nbd
truncate -s 64M /srv/nbd/data.img
{
    printf '[generic]\nuser = root\ngroup = root\nlistenaddr = 127.0.0.1\nport = 10809\nallowlist = true\n'
    printf '[data]\nexportname = /srv/nbd/data.img\n'
    for i in $(seq 0 15); do truncate -s 16M "/srv/nbd/m$i.img"; printf '[m%d]\nexportname = /srv/nbd/m%d.img\n' "$i" "$i"; done
} >/srv/nbd/nbd-server.conf
nbd-server -C /srv/nbd/nbd-server.conf >/tmp/nbd-server.log 2>&1
wait_port 10809 && r server_nbd_server up || { r server_nbd_server down; cat /tmp/nbd-server.log; }
# nbdkit announces (NBD_INFO_BLOCK_SIZE) and enforces a 64 KiB maximum request: the driver's own limit is 128 KiB,
# so the "mem" mapping's direct-I/O round trip works only if the daemon capped the device's requests (sysfs, which
# the unit's ProtectKernelTunables= leaves writable for block devices only through its ReadWritePaths=).
nbdkit --ipaddr 127.0.0.1 --port 10810 --filter=blocksize-policy memory 64M blocksize-maximum=64K blocksize-error-policy=error >/tmp/nbdkit.log 2>&1
wait_port 10810 && r server_nbdkit up || { r server_nbdkit down; cat /tmp/nbdkit.log; }
qemu-img create -q -f qcow2 /srv/nbd/qemu.qcow2 64M
qemu-nbd --fork --persistent --shared=8 --bind=127.0.0.1 --port=10811 --export-name=qemu --format=qcow2 /srv/nbd/qemu.qcow2 >/tmp/qemu-nbd.log 2>&1
wait_port 10811 && r server_qemu_nbd up || { r server_qemu_nbd down; cat /tmp/qemu-nbd.log; }

# ---------------------------------------------------------------- nbd-client baseline (ioctl mode keeps a process)
mark client
client_pids() { local d; for d in /sys/block/nbd*/pid; do [ -e "$d" ] && cat "$d"; done; }
client_up() { # EXPORT PORT DEVICE; one retry: a first connect on a loaded TCG host has been seen to stall
    timeout 60 nbd-client 127.0.0.1 "$2" "$3" -N "$1" -L >/dev/null 2>&1 && return 0
    [ -e "/sys/block/$(basename "$3")/pid" ] && return 0
    timeout 60 nbd-client 127.0.0.1 "$2" "$3" -N "$1" -L >/dev/null 2>&1
}
# Connects and disconnects run in parallel (sixteen sequential nbd-client starts cost a minute under TCG); a
# second, sequential pass catches any disconnect that lost a race, so the daemon section starts on free devices.
client_down_all() {
    local d i
    for d in /dev/nbd*; do [ -e "/sys/block/$(basename "$d")/pid" ] && timeout 30 nbd-client -d "$d" >/dev/null 2>&1 & done
    wait
    for d in /dev/nbd*; do [ -e "/sys/block/$(basename "$d")/pid" ] && timeout 30 nbd-client -d "$d" >/dev/null 2>&1; done
    for i in $(seq 1 100); do [ "$(client_pids | wc -l)" -eq 0 ] && break; sleep 0.1; done
}
client_up data 10809 /dev/nbd0; r client1_rc "$?"
for i in $(seq 1 100); do [ "$(client_pids | wc -l)" -ge 1 ] && break; sleep 0.1; done
r client1_io_data "$(roundtrip /dev/nbd0 cdata)"
sum=0; for p in $(client_pids); do sum=$((sum + $(rss_kb "$p"))); done
r client1_procs "$(client_pids | wc -l)"
r nbd_client_rss_kb_1 "$sum"
client_down_all
mark client16_up
for i in $(seq 0 15); do client_up "m$i" 10809 "/dev/nbd$i" & done
wait
# nbd-client returns before its forked child has entered NBD_DO_IT (which creates the pid file): give it 10 s.
for i in $(seq 1 100); do [ "$(client_pids | wc -l)" -ge 16 ] && break; sleep 0.1; done
r client16_connected "$(client_pids | wc -l)"
sum=0; for p in $(client_pids); do sum=$((sum + $(rss_kb "$p"))); done
r client16_procs "$(client_pids | wc -l)"
r nbd_client_rss_kb_16 "$sum"
mark client16_down
client_down_all
r client_after_down_pids "$(client_pids | wc -l)"
mark client_done

# ---------------------------------------------------------------- nbd-daemon under systemd
mark daemon
if ! systemctl cat nbd-daemon.service >/dev/null 2>&1; then
    r daemon_installed no
    exit 0
fi
r daemon_installed yes
r daemon_unit_type "$(prop nbd-daemon Type)"
# The unit as installed, checked by systemd itself: unknown keys, bad values, missing executables are warnings here.
timeout 60 systemd-analyze verify /etc/systemd/system/nbd-daemon.service >/tmp/unit-verify.out 2>&1; r daemon_unit_verify_rc "$?"
r daemon_unit_verify_lines "$(grep -c 'nbd-daemon' /tmp/unit-verify.out)"
sed 's/^/unit-verify: /' /tmp/unit-verify.out | head -n 20
if systemctl is-active -q nbd-daemon.service; then
    r daemon_active_at_boot yes
    timeout 30 systemctl stop nbd-daemon.service
else
    r daemon_active_at_boot no
fi
mkdir -p /etc/nbd-daemon
r daemon_pre_connected "$(client_pids | wc -l)"

write_config() { # lines "NAME URI DEVICE" on stdin -> /etc/nbd-daemon/appsettings.json
    local first=1 name uri dev
    {
        printf '{\n  "Nbd": {\n    "Mappings": [\n'
        while read -r name uri dev; do
            [ "$first" -eq 1 ] || printf ',\n'
            first=0
            printf '      { "Name": "%s", "Uri": "%s", "Device": "%s", "Interface": "Ioctl" }' "$name" "$uri" "$dev"
        done
        printf '\n    ]\n  }\n}\n'
    } >/etc/nbd-daemon/appsettings.json
}

# start_daemon PREFIX: start, time the blocking start, report the unit's state and the daemon's RSS.
start_daemon() {
    local p=$1 t0 t1 rc pid exec_us active_us
    systemctl reset-failed nbd-daemon.service 2>/dev/null
    t0=$(now_ms); timeout 45 systemctl start nbd-daemon.service; rc=$?; t1=$(now_ms)
    r "${p}_start_rc" "$rc"
    r "${p}_start_ms" "$((t1 - t0))"
    for prop_name in StatusText ActiveState SubState MainPID; do r "${p}_$prop_name" "$(prop nbd-daemon "$prop_name")"; done
    exec_us=$(prop nbd-daemon ExecMainStartTimestampMonotonic); active_us=$(prop nbd-daemon ActiveEnterTimestampMonotonic)
    if [ "${exec_us:-0}" -gt 0 ] && [ "${active_us:-0}" -ge "$exec_us" ]; then r "${p}_ready_ms" "$(( (active_us - exec_us) / 1000 ))"; fi
    pid=$(prop nbd-daemon MainPID)
    [ "${pid:-0}" -gt 0 ] && r "${p}_rss_kb" "$(rss_kb "$pid")"
}
# stop_daemon PREFIX DEVICES...: stop, then every device must be disconnected and the unit inactive, not failed.
stop_daemon() {
    local p=$1 t0 t1 rc d connected=0; shift
    t0=$(now_ms); timeout 40 systemctl stop nbd-daemon.service; rc=$?; t1=$(now_ms)
    r "${p}_stop_rc" "$rc"
    r "${p}_stop_ms" "$((t1 - t0))"
    r "${p}_after_stop_ActiveState" "$(prop nbd-daemon ActiveState)"
    r "${p}_after_stop_Result" "$(prop nbd-daemon Result)"
    for d in "$@"; do
        if [ "$(dev_size "$d")" != 0 ] || [ "$(dev_pid "$d")" = present ]; then connected=$((connected + 1)); fi
    done
    r "${p}_after_stop_connected" "$connected"
}

# Three mappings, one per server kind.
write_config <<CFG
data nbd://127.0.0.1:10809/data /dev/nbd0
mem nbd://127.0.0.1:10810/mem /dev/nbd1
qemu nbd://127.0.0.1:10811/qemu /dev/nbd2
CFG
start_daemon daemon3
for m in data:/dev/nbd0 mem:/dev/nbd1 qemu:/dev/nbd2; do
    name=${m%%:*} dev=${m#*:}
    r "daemon3_${name}_size" "$(dev_size "$dev")"
    r "daemon3_${name}_owner" "$(dev_owner "$dev" "$(prop nbd-daemon MainPID)")"
    r "daemon3_io_${name}" "$(roundtrip "$dev" "d$name")"
    r "daemon3_${name}_max_sectors_kb" "$(cat "/sys/block/$(basename "$dev")/queue/max_sectors_kb" 2>/dev/null || echo missing)"
done
journalctl --sync 2>/dev/null
for name in data mem qemu; do
    r "daemon3_journal_${name}" "$(journalctl --no-pager -o json -u nbd-daemon "MAPPING=$name" | grep -c "\"MAPPING\":\"$name\"")"
done
# SIGHUP, as an admin expecting a reload sends it: ignored with a warning (its default action would end the
# process at once, nothing torn down, and systemd counts that as a clean exit: the unit would stay down).
pid_before=$(prop nbd-daemon MainPID) restarts_before=$(prop nbd-daemon NRestarts)
kill -HUP "$pid_before" 2>/dev/null
sleep 2
r daemon3_hup_ActiveState "$(prop nbd-daemon ActiveState)"
r daemon3_hup_same_pid "$([ "$(prop nbd-daemon MainPID)" = "$pid_before" ] && echo yes || echo no)"
r daemon3_hup_NRestarts_delta "$(( $(prop nbd-daemon NRestarts) - restarts_before ))"
r daemon3_hup_data_owner "$(dev_owner /dev/nbd0 "$pid_before")"
r daemon3_hup_io_data "$(roundtrip /dev/nbd0 dhup)"
journalctl --sync 2>/dev/null
r daemon3_hup_journal_warning "$(journalctl --no-pager -o json -u nbd-daemon "_PID=$pid_before" | grep -c 'SIGHUP ignored: there is no reload')"
stop_daemon daemon3 /dev/nbd0 /dev/nbd1 /dev/nbd2

# One mapping, then sixteen: READY time and RSS.
mark daemon1
echo "d1 nbd://127.0.0.1:10809/data /dev/nbd0" | write_config
start_daemon daemon1
stop_daemon daemon1 /dev/nbd0
devs=()
for i in $(seq 0 15); do echo "m$i nbd://127.0.0.1:10809/m$i /dev/nbd$i"; done | write_config
for i in $(seq 0 15); do devs+=("/dev/nbd$i"); done
start_daemon daemon16
main=$(prop nbd-daemon MainPID)
n=0; for d in "${devs[@]}"; do [ "$(dev_size "$d")" != 0 ] && [ "$(dev_owner "$d" "$main")" = daemon ] && n=$((n + 1)); done
r daemon16_connected "$n"
stop_daemon daemon16 "${devs[@]}"

# A crash loop: a drop-in makes every start fail at once (as a daemon crashing at start would), for 15 s. The unit
# must keep restarting (RestartSec=1: NRestarts grows by about one a second) and must not give up (systemd's default
# start limit, 5 starts in 10 s, would leave it failed with start-limit-hit: the devices would then wait for a daemon
# that never comes back); once the drop-in is gone, it recovers by itself, with no `systemctl reset-failed`.
mark crashloop
echo "d1 nbd://127.0.0.1:10809/data /dev/nbd0" | write_config
mkdir -p /run/systemd/system/nbd-daemon.service.d
printf '[Service]\nExecStartPre=/bin/false\n' >/run/systemd/system/nbd-daemon.service.d/crashloop.conf
systemctl daemon-reload
# reset-failed makes the next start flush NRestarts to 0: what it reads afterwards is the restarts of this loop alone.
systemctl reset-failed nbd-daemon.service 2>/dev/null
timeout 10 systemctl start --no-block nbd-daemon.service
sleep 15
r crashloop_NRestarts_delta "$(prop nbd-daemon NRestarts)"
r crashloop_ActiveState "$(prop nbd-daemon ActiveState)"
r crashloop_Result "$(prop nbd-daemon Result)"
rm -f /run/systemd/system/nbd-daemon.service.d/crashloop.conf
systemctl daemon-reload
t0=$(now_ms); state=
for i in $(seq 1 600); do
    state=$(prop nbd-daemon ActiveState)
    [ "$state" = active ] || [ "$state" = failed ] || [ "$state" = inactive ] && break
    sleep 0.1
done
r crashloop_recovered_ActiveState "$state"
r crashloop_recovered_ms "$(( $(now_ms) - t0 ))"
r crashloop_recovered_data_size "$(dev_size /dev/nbd0)"
stop_daemon crashloop /dev/nbd0

# install.sh --uninstall with the service running: stopped (OnStop: the device disconnected) and disabled, the unit
# and the binaries gone, the configuration kept.
mark uninstall
systemctl enable nbd-daemon.service >/dev/null 2>&1
start_daemon uninstall
r uninstall_data_size_before "$(dev_size /dev/nbd0)"
if [ -f /opt/nbd-install/deploy/install.sh ]; then
    timeout 120 bash /opt/nbd-install/deploy/install.sh --uninstall >/tmp/uninstall.out 2>&1; r uninstall_rc "$?"
    sed 's/^/LOG uninstall: /' /tmp/uninstall.out
else
    r uninstall_rc absent
fi
r uninstalled_LoadState "$(prop nbd-daemon LoadState)"
r uninstalled_ActiveState "$(prop nbd-daemon ActiveState)"
r uninstalled_wants_link "$(ls /etc/systemd/system/*.wants/nbd-daemon.service >/dev/null 2>&1 && echo present || echo absent)"
r uninstalled_lib "$([ -e /usr/local/lib/nbd-daemon ] && echo present || echo absent)"
r uninstalled_unit_file "$([ -e /etc/systemd/system/nbd-daemon.service ] && echo present || echo absent)"
r uninstalled_config "$([ -e /etc/nbd-daemon/appsettings.json ] && echo kept || echo gone)"
r uninstalled_data_size_after "$(dev_size /dev/nbd0)"
r uninstalled_data_pid_after "$(dev_pid /dev/nbd0)"
mark done

# Scenario 1: nbd-daemon maps nbd-server, nbdkit (file, memory over a unix socket) and qemu-nbd exports over
# ioctl and netlink; 32 MiB of random data written with O_DIRECT, read back, and found in the backing file.
# ioctl writes at offset 0 MiB, netlink at 32 MiB of each 64 MiB export, so no reset is needed in between.
. /usr/local/lib/nbdvm.sh
MiB=1048576
head -c $((32 * MiB)) /dev/urandom > /tmp/data
want=$(sha_file /tmp/data)

truncate -s 64M /tmp/srv.img /tmp/srv2.img /tmp/kit.img /tmp/qemu.img
start_nbd_server 10809 srv /tmp/srv.img other /tmp/srv2.img || note "nbd-server did not start"
nbdkit -i 127.0.0.1 -p 10810 -P /run/nbdkit-file.pid file /tmp/kit.img || note "nbdkit file did not start"
nbdkit -U /tmp/mem.sock -P /run/nbdkit-mem.pid memory 64M || note "nbdkit memory did not start"
qemu-nbd -f raw -x qexp -b 127.0.0.1 -p 10811 -t --fork /tmp/qemu.img || note "qemu-nbd did not start"
wait_port 10810 10; wait_port 10811 10; wait_path /tmp/mem.sock 10

wait_handshake 10809

# list: both exports of the nbd-server
nbd-daemon list nbd://127.0.0.1:10809 > /tmp/list.out 2>&1; lrc=$?
sed 's/^/LOG list: /' /tmp/list.out
result list rc=$lrc has_srv=$(grep -qw srv /tmp/list.out && echo yes || echo no) \
    has_other=$(grep -qw other /tmp/list.out && echo yes || echo no)

# map SERVER URI BACKING MODE
map() {
    local server=$1 uri=$2 backing=$3 mode=$4 off log connected cms size wrc rrc wms rms readback backingok
    off=0; [ "$mode" = netlink ] && off=32
    log=/tmp/map-$server-$mode.log
    daemon_connect "$log" "$uri" /dev/nbd0 --interface "$mode"
    cms=$(wait_connected nbd0 30 $DPID); connected=$(yesno $?)
    size=$(nbd_bytes nbd0)
    t0=$(now_ms); timeout 120 dd if=/tmp/data of=/dev/nbd0 bs=1M seek=$off oflag=direct 2>/dev/null; wrc=$?
    wms=$(( $(now_ms) - t0 ))
    t0=$(now_ms); timeout 120 dd if=/dev/nbd0 of=/tmp/back bs=1M skip=$off count=32 iflag=direct 2>/dev/null; rrc=$?
    rms=$(( $(now_ms) - t0 ))
    readback=mismatch; [ "$(sha_file /tmp/back)" = "$want" ] && readback=match
    rm -f /tmp/back
    daemon_kill "$DPID" TERM
    fms=$(wait_free nbd0 5); freed=$(yesno $?)
    backingok=none
    if [ "$backing" != - ]; then
        backingok=mismatch
        [ "$(dd if="$backing" bs=1M skip=$off count=32 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$want" ] && backingok=match
    fi
    result map server=$server mode=$mode connected=$connected connect_ms=$cms size=$size write_rc=$wrc write_ms=$wms \
        read_rc=$rrc read_ms=$rms readback=$readback backing=$backingok exit_rc=$EXIT_RC exit_ms=$EXIT_MS freed=$freed
    [ "$connected" = yes ] && [ "$readback" = match ] && [ "$EXIT_RC" = 0 ] || show_log "$log"
}

for mode in ioctl netlink; do
    map nbd-server nbd://127.0.0.1:10809/srv /tmp/srv.img $mode
    map nbdkit-file nbd://127.0.0.1:10810/kit /tmp/kit.img $mode
    map nbdkit-memory "nbd+unix:///mem?socket=/tmp/mem.sock" - $mode
    map qemu-nbd nbd://127.0.0.1:10811/qexp /tmp/qemu.img $mode
done

# Anchor: the stock nbd-client maps an nbd-server export over ioctl (-L) and netlink; 8 MiB direct I/O round trip.
. /usr/local/lib/nbdvm.sh

truncate -s 64M /tmp/anchor.img
start_nbd_server 10809 anchor /tmp/anchor.img || { result anchor error=nbd-server-start; exit 1; }

for mode in ioctl netlink; do
    flag=""; [ "$mode" = ioctl ] && flag="-L"
    head -c 8388608 /dev/urandom > /tmp/data
    nbd-client 127.0.0.1 10809 /dev/nbd0 -N anchor $flag; crc=$?
    cms=$(wait_connected nbd0 10); conn=$?
    size=$(nbd_bytes nbd0)
    dd if=/tmp/data of=/dev/nbd0 bs=1M oflag=direct 2>/dev/null; wrc=$?
    dd if=/dev/nbd0 of=/tmp/back bs=1M count=8 iflag=direct 2>/dev/null; rrc=$?
    readback=mismatch; cmp -s /tmp/data /tmp/back && readback=match
    backing=mismatch; [ "$(sha_file /tmp/data)" = "$(sha_head /tmp/anchor.img 8388608)" ] && backing=match
    nbd-client -d /dev/nbd0 >/dev/null 2>&1; drc=$?
    fms=$(wait_free nbd0 5); freed=$?
    result anchor mode=$mode connect_rc=$crc connected=$([ $conn = 0 ] && echo yes || echo no) connect_ms=$cms \
        size=$size write_rc=$wrc read_rc=$rrc readback=$readback backing=$backing \
        disconnect_rc=$drc freed=$([ $freed = 0 ] && echo yes || echo no) free_ms=$fms
done

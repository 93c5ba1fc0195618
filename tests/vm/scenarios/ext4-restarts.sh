# ext4 on a netlink mapping survives its server being SIGKILLed and restarted, EXT4_RESTARTS times (default 3 = CI).
# The full run is 10: `NBD_VM_EXT4_RESTARTS=10 dotnet test tests/Vm.Tests --filter Ext4RestartTests`, or by hand
#   (echo EXT4_RESTARTS=10; cat tests/vm/scenarios/ext4-restarts.sh) > /tmp/ext4-10.sh
#   tests/vm/run-vm.sh --script /tmp/ext4-10.sh --daemon PUBLISH_DIR --bin nbdkit --bin mkfs.ext4 --bin e2fsck
# (the VM has no environment to pass the count through; ~50 s for 3 restarts, ~2 min for 10 under TCG).
#
# Server: nbdkit file plugin in the foreground (one process, so SIGKILL really drops the connection).
# Daemon: one netlink mapping, Timeout 5 s, DeadConnectionTimeout 60 s, Reconnect 0.25 s .. 1 s.
# mkfs.ext4 + mount (errors=remount-ro, so an ext4 error also shows up as failing writes), then a writer creates
# files of random sizes (4 KiB .. 2 MiB, /dev/urandom) and records each sha256 in a manifest on tmpfs, with
# `sync -f` (syncfs: reports writeback errors) every 4 files, and keeps at most KEEP files by deleting the oldest.
# Meanwhile: kill -KILL nbdkit, wait 1..3 s, start it again; an O_DIRECT read of the raw device measures when I/O
# flows again. Afterwards: umount, e2fsck -fn, mount read-only, sha256sum -c the manifest.
#
# RESULT ext4_restart n=.. down_ms=.. io_after_up_ms=.. io_after_kill_ms=.. probe_rc=.. write_stall_ms=..
#   one per restart; write_stall_ms = the longest writer operation (write, sync, rm) overlapping [kill, I/O back].
# RESULT ext4 restarts=.. write_errors=.. kernel_io_errors=.. ext4_errors=.. fsck_rc=.. files=.. files_on_fs=..
#   checksum_mismatches=.. max_write_stall_ms=.. ...   the whole run.
. /usr/local/lib/nbdvm.sh
R=${EXT4_RESTARTS:-3}
MiB=1048576
KEEP=120
PORT=10809
IMG=/tmp/ext4.img
MNT=/mnt/ext4
W=/tmp/writer
LOG=/tmp/daemon.log

tool() { command -v "$1" >/dev/null && echo yes || echo no; }
result tools nbdkit=$(tool nbdkit) mkfs_ext4=$(tool mkfs.ext4) e2fsck=$(tool e2fsck) daemon=$(tool nbd-daemon) \
    random=$([ -n "$RANDOM" ] && echo yes || echo no)

# e2fsck and mount look for the mount table here
ln -sf /proc/mounts /etc/mtab
mkdir -p $MNT /etc/nbd-daemon
truncate -s 512M $IMG

start_kit() {
    nbdkit -f -i 127.0.0.1 -p $PORT file $IMG >>/tmp/nbdkit.log 2>&1 &
    KIT=$!
    wait_port $PORT 20
}
start_kit || note "nbdkit did not start"

cat > /etc/nbd-daemon/appsettings.json <<EOF
{ "Nbd": { "Mappings": [
  { "Name": "ext4", "Uri": "nbd://127.0.0.1:$PORT/ext4", "Device": "/dev/nbd0", "Interface": "Netlink",
    "Timeout": "00:00:05", "DeadConnectionTimeout": "00:01:00",
    "Reconnect": { "InitialDelay": "00:00:00.250", "MaxDelay": "00:00:01" } }
] } }
EOF
echo "nbd-daemon (config: /etc/nbd-daemon/appsettings.json)" > $LOG
nbd-daemon >>$LOG 2>&1 &
DPID=$!
cms=$(wait_connected nbd0 60 $DPID); connected=$(yesno $?)

# kernel log from here on: every I/O or ext4 error counts, including mkfs and the checks at the end
dmesg -c >/dev/null
t0=$(now_ms); mkfs.ext4 -F -q /dev/nbd0 >/tmp/mkfs.out 2>&1; mkfs_rc=$?; mkfs_ms=$(( $(now_ms) - t0 ))
sed 's/^/LOG mkfs: /' /tmp/mkfs.out
mount -t ext4 -o errors=remount-ro /dev/nbd0 $MNT; mount_rc=$?
result setup connected=$connected connect_ms=$cms size=$(nbd_bytes nbd0) mkfs_rc=$mkfs_rc mkfs_ms=$mkfs_ms mount_rc=$mount_rc

# op START_MS END_MS RC KIND N BYTES  -> one line in $W.ops
op() { echo "$*" >> $W.ops; }

writer() {
    local n=0 size sum t0 rc old
    : > $W.ops; : > $W.manifest; : > $W.err
    while [ ! -e $W.stop ]; do
        n=$((n + 1))
        size=$(( 4096 + (RANDOM * 32768 + RANDOM) % (2 * MiB - 4096 + 1) ))
        head -c $size /dev/urandom > $W.dat
        sum=$(sha_file $W.dat)
        t0=$(now_ms); cat $W.dat > $MNT/f$n 2>>$W.err; rc=$?
        op "$t0 $(now_ms) $rc write $n $size"
        [ $rc = 0 ] && echo "$sum  f$n" >> $W.manifest
        if [ $((n % 4)) = 0 ]; then
            t0=$(now_ms); sync -f $MNT/f$n 2>>$W.err; rc=$?
            op "$t0 $(now_ms) $rc sync $n 0"
        fi
        old=$((n - KEEP))
        if [ $old -ge 1 ]; then
            t0=$(now_ms); rm $MNT/f$old 2>>$W.err; rc=$?
            op "$t0 $(now_ms) $rc rm $old 0"
            [ $rc = 0 ] && sed -i "/  f$old\$/d" $W.manifest
        fi
    done
    t0=$(now_ms); sync -f $MNT 2>>$W.err; rc=$?
    op "$t0 $(now_ms) $rc sync final 0"
}

rm -f $W.stop /tmp/restarts
: > /tmp/restarts
if [ "$mount_rc" = 0 ]; then
    writer &
    WPID=$!
    sleep 3
    r=0
    while [ $r -lt "$R" ]; do
        r=$((r + 1))
        t_kill=$(now_ms)
        kill -KILL $KIT; wait $KIT 2>/dev/null
        down=$(( 1000 + RANDOM % 2001 ))
        sleep "$(awk "BEGIN { print $down / 1000 }")"
        start_kit || note "nbdkit restart $r failed"
        t_up=$(now_ms)
        # blocks while the kernel holds I/O; returns once the new socket serves
        timeout 90 dd if=/dev/nbd0 of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; prc=$?
        t_io=$(now_ms)
        echo "$r $t_kill $t_up $t_io $prc" >> /tmp/restarts
        # writing with the server up before the next kill
        sleep $(( 2 + RANDOM % 3 ))
    done
    touch $W.stop
    wait $WPID
fi

# per restart: the longest writer operation overlapping [kill, I/O back]
while read -r n tk tu ti prc; do
    stall=$(awk -v a="$tk" -v b="$ti" '$2 >= a && $1 <= b && $2 - $1 > m { m = $2 - $1 } END { print m + 0 }' $W.ops)
    result ext4_restart n=$n down_ms=$((tu - tk)) io_after_up_ms=$((ti - tu)) io_after_kill_ms=$((ti - tk)) \
        probe_rc=$prc write_stall_ms=$stall
done < /tmp/restarts

ops=$(wc -l < $W.ops)
write_errors=$(awk '$3 != 0' $W.ops | wc -l)
max_stall=$(awk '$2 - $1 > m { m = $2 - $1 } END { print m + 0 }' $W.ops)
written_mib=$(awk '$4 == "write" { s += $6 } END { printf "%d\n", s / 1048576 }' $W.ops)
probe_fails=$(awk '$5 != 0' /tmp/restarts | wc -l)
reconnecting=$(grep -c -- '-> Reconnecting' $LOG)
serving=$(grep -c -- '-> Serving' $LOG)
alive=$(proc_gone $DPID && echo no || echo yes)
pid_attr=$([ -e /sys/block/nbd0/pid ] && echo present || echo absent)
size=$(nbd_bytes nbd0)

umount $MNT; umount_rc=$?
e2fsck -fn /dev/nbd0 >/tmp/fsck.out 2>&1; fsck_rc=$?
sed 's/^/LOG e2fsck: /' /tmp/fsck.out | head -n 40
mount -t ext4 -o ro /dev/nbd0 $MNT; remount_rc=$?
files=$(wc -l < $W.manifest)
files_on_fs=$(ls $MNT | grep -c '^f[0-9]*$')
(cd $MNT && sha256sum -c $W.manifest) > /tmp/check.out 2>&1
checked_ok=$(grep -c ': OK$' /tmp/check.out)
grep -v ': OK$' /tmp/check.out | head -n 20 | sed 's/^/LOG sha256sum: /'
umount $MNT

dmesg > /tmp/kmsg
kernel_io_errors=$(grep -c 'I/O error' /tmp/kmsg)
ext4_errors=$(grep -c 'EXT4-fs error\|EXT4-fs warning\|Aborting journal\|Remounting filesystem read-only\|JBD2: .*[Ee]rror' /tmp/kmsg)
nbd_msgs=$(grep -c 'nbd0' /tmp/kmsg)

result ext4 restarts=$(wc -l < /tmp/restarts) write_errors=$write_errors kernel_io_errors=$kernel_io_errors \
    ext4_errors=$ext4_errors fsck_rc=$fsck_rc files=$files files_on_fs=$files_on_fs \
    checksum_mismatches=$((files - checked_ok)) max_write_stall_ms=$max_stall ops=$ops written_mib=$written_mib \
    probe_fails=$probe_fails reconnecting_lines=$reconnecting serving_lines=$serving daemon_alive=$alive \
    pid=$pid_attr size=$size umount_rc=$umount_rc remount_rc=$remount_rc
head -n 20 $W.err | sed 's/^/LOG writer: /'
grep 'nbd0\|EXT4\|JBD2\|I/O error' /tmp/kmsg | head -n 40 | sed 's/^/LOG kernel: /'

daemon_kill $DPID TERM
result stop exit_rc=$EXIT_RC exit_ms=$EXIT_MS freed=$(wait_free nbd0 5 >/dev/null; yesno $?)
grep -v '^   at \|^   --- End\|^ ---> ' $LOG > /tmp/log-short
if [ "$(wc -l < /tmp/log-short)" -le 100 ]; then sed 's/^/LOG daemon: /' /tmp/log-short
else head -n 30 /tmp/log-short | sed 's/^/LOG daemon: /'; echo "LOG daemon: ..."
     tail -n 60 /tmp/log-short | sed 's/^/LOG daemon: /'; fi
kill -KILL $KIT 2>/dev/null

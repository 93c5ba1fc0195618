#!/bin/sh
# The demo's steps (POSIX sh, so busybox in the VM tier runs it too): a local nbdkit memory export, mapped by the
# daemon, ext4 made on the device, a file written, read back after a remount, and everything cleaned up.
#   NBD_DAEMON  the nbd-daemon executable        (default: nbd-daemon on PATH)
#   DEMO_DEVICE the device to use                (default: /dev/nbd0)
set -eu
daemon=${NBD_DAEMON:-nbd-daemon}
dev=${DEMO_DEVICE:-/dev/nbd0}
name=${dev#/dev/}
port=10899
work=$(mktemp -d /tmp/nbd-demo.XXXXXX)
say() { echo "demo: $*"; }
cleanup() {
    set +e
    mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt"
    [ -n "${daemon_pid:-}" ] && kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

say "starting nbdkit: a 256 MiB memory export 'demo' on 127.0.0.1:$port"
nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p "$port" -e demo memory 256M &
server_pid=$!
i=0; until nbdinfo --size "nbd://127.0.0.1:$port/demo" >/dev/null 2>&1 || [ $i -ge 50 ]; do sleep 0.2; i=$((i + 1)); done

say "starting the daemon with one mapping: demo = nbd://127.0.0.1:$port/demo -> $dev"
"$daemon" --Nbd:Mappings:0:Name=demo --Nbd:Mappings:0:Uri="nbd://127.0.0.1:$port/demo" --Nbd:Mappings:0:Device="$dev" &
daemon_pid=$!
i=0; until [ -f "/sys/block/$name/pid" ] || [ $i -ge 150 ]; do sleep 0.2; i=$((i + 1)); done
[ -f "/sys/block/$name/pid" ] || { say "FAILED: $dev was not connected within 30 s"; exit 1; }
say "$dev is connected: $(cat "/sys/block/$name/size") sectors, block size $(cat "/sys/block/$name/queue/logical_block_size")"

say "making an ext4 filesystem on $dev"
mkfs.ext4 -q -F "$dev"
mkdir -p "$work/mnt"
mount "$dev" "$work/mnt"
head -c 8388608 /dev/urandom > "$work/payload"
want=$(sha256sum < "$work/payload" | cut -d' ' -f1)
cp "$work/payload" "$work/mnt/payload"
umount "$work/mnt"
say "wrote an 8 MiB file (sha256 $want), unmounted"

mount "$dev" "$work/mnt"
got=$(sha256sum < "$work/mnt/payload" | cut -d' ' -f1)
umount "$work/mnt"
[ "$got" = "$want" ] || { say "FAILED: read back sha256 $got"; exit 1; }
say "remounted and read it back: sha256 matches"

say "stopping the daemon (SIGTERM)"
rc=0
kill -TERM "$daemon_pid"; wait "$daemon_pid" || rc=$?; daemon_pid=
[ "$rc" = 0 ] || { say "FAILED: the daemon exited with $rc"; exit 1; }
[ ! -f "/sys/block/$name/pid" ] && [ "$(cat "/sys/block/$name/size")" = 0 ] || { say "FAILED: $dev still configured"; exit 1; }
say "daemon exited with $rc; $dev is free again (size 0, no pid)"
say "OK"

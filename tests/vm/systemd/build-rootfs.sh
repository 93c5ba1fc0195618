#!/usr/bin/env bash
# Builds (once) the full-tier root filesystem: a debootstrapped Debian bookworm with real systemd, journald,
# udev and the NBD servers the scenarios use, plus nbd.ko from the cached Debian cloud kernel.
#
# Two cache levels under ${NBD_VM_CACHE:-/var/cache/nbd-daemon-vm}/systemd/:
#   base-<key>.tar   the raw debootstrap result, keyed by suite + package list (the slow part, ~1-2 min);
#   rootfs-<key>.tar base + kernel modules + boot customisation, keyed by base key, kernel version and this
#                    script's own content (cheap to redo when the customisation changes).
# Prints KEY=VALUE lines: ROOTFS_TARBALL, KERNEL_VERSION, KERNEL_IMAGE.
#
# The package mirror is never written down: it is read at run time from this machine's apt sources (the entry
# that serves "debian" bookworm main), so the build follows whatever mirror the machine is configured for.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
CACHE="${NBD_VM_CACHE:-/var/cache/nbd-daemon-vm}"
SUITE=bookworm
# Everything a scenario runs inside the VM. Changing this list rebuilds the base tarball.
PACKAGES="systemd,systemd-sysv,udev,kmod,iproute2,procps,nbd-server,nbd-client,nbdkit,qemu-utils"

log() { echo "build-rootfs: $*" >&2; }
die() { log "$*"; exit 1; }

for tool in debootstrap tar chroot sha256sum flock; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (apt-get install debootstrap coreutils tar util-linux)"
done
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot)"

# --- mirror: the apt source serving Debian bookworm main on this machine -------------------------------------
find_mirror() {
    local f
    # deb822 .sources files: a stanza with Types: deb, a bookworm suite, main component, URI ending in /debian.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && (" " comps " ") ~ / main / )
                    { n = split(uris, u, " "); for (i = 1; i <= n; i++) if (u[i] ~ /\/debian\/?$/) { print u[i]; exit } }
                types = suites = comps = uris = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]*#/ { next }
            tolower($1) == "types:"      { $1 = ""; types = $0 }
            tolower($1) == "suites:"     { $1 = ""; suites = $0 }
            tolower($1) == "components:" { $1 = ""; comps = $0 }
            tolower($1) == "uris:"       { $1 = ""; uris = $0 }
            END { flush() }' "$f"
    done
    # One-line format: deb [options] URI SUITE COMPONENTS...
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        sed -e 's/\[[^]]*\]//' "$f" | awk -v suite="$SUITE" '
            $1 == "deb" && $3 == suite && $2 ~ /\/debian\/?$/ { for (i = 4; i <= NF; i++) if ($i == "main") { print $2; exit } }'
    done
}

# --- kernel: the shared fetch script when the tree has it, else the same recipe inline -------------------------
fetch_kernel() {
    if [ -x "$repo/tests/vm/fetch-kernel.sh" ] || [ -f "$repo/tests/vm/fetch-kernel.sh" ]; then
        sh "$repo/tests/vm/fetch-kernel.sh"
        return
    fi
    mkdir -p "$CACHE"
    (
        exec 9>"$CACHE/.kernel.lock"; flock 9
        pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
              | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)
        if [ -n "$pkg" ]; then ver=${pkg#linux-image-}
        else ver=$(basename "$(ls -d "$CACHE"/kernel/*/ 2>/dev/null | sort -V | tail -n1)" 2>/dev/null || true); fi
        [ -n "$ver" ] || die "cannot resolve linux-image-cloud-amd64 (run apt-get update)"
        root="$CACHE/kernel/$ver"
        if [ ! -f "$root/.complete" ]; then
            tmp=$(mktemp -d "$CACHE/.dl.XXXXXX")
            (cd "$tmp" && apt-get download "linux-image-$ver" >&2)
            mkdir -p "$tmp/x" && dpkg-deb -x "$tmp"/*.deb "$tmp/x"
            rm -rf "$root"; mkdir -p "$CACHE/kernel"; mv "$tmp/x" "$root"; rm -rf "$tmp"
            touch "$root/.complete"
        fi
        echo "KERNEL_VERSION=$ver"
        echo "KERNEL_ROOT=$root"
        echo "KERNEL_IMAGE=$root/boot/vmlinuz-$ver"
        echo "NBD_KO=$root/lib/modules/$ver/kernel/drivers/block/nbd.ko"
    )
}

kernel_env=$(fetch_kernel) || die "kernel fetch failed"
KERNEL_VERSION=$(sed -n 's/^KERNEL_VERSION=//p' <<<"$kernel_env")
KERNEL_ROOT=$(sed -n 's/^KERNEL_ROOT=//p' <<<"$kernel_env")
KERNEL_IMAGE=$(sed -n 's/^KERNEL_IMAGE=//p' <<<"$kernel_env")
NBD_KO=$(sed -n 's/^NBD_KO=//p' <<<"$kernel_env")
[ -f "$KERNEL_IMAGE" ] && [ -f "$NBD_KO" ] || die "kernel files missing after fetch"
[ -n "$KERNEL_ROOT" ] || KERNEL_ROOT=${KERNEL_IMAGE%/boot/*}

mkdir -p "$CACHE/systemd"
exec 8>"$CACHE/systemd/.lock"
flock 8

base_key=$(printf '%s\n%s\n' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-16)
base="$CACHE/systemd/base-$base_key.tar"
if [ ! -f "$base" ]; then
    mirror=$(find_mirror | head -n1)
    [ -n "$mirror" ] || die "no apt source for debian $SUITE main found in /etc/apt/sources.list{,.d/*}"
    dir=$(mktemp -d "$CACHE/systemd/.debootstrap.XXXXXX")
    trap 'rm -rf "$dir"' EXIT
    log "debootstrap $SUITE (minbase + $PACKAGES) from the configured apt mirror; log in $CACHE/systemd/debootstrap.log"
    if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$dir" "$mirror" >"$CACHE/systemd/debootstrap.log" 2>&1; then
        # The mirror stays out of every message: its host is replaced before the log tail is shown.
        host=$(sed -E 's#^[a-z]+://([^/]+).*#\1#' <<<"$mirror")
        tail -n 30 "$CACHE/systemd/debootstrap.log" | sed -e "s#$mirror#<apt-mirror>#g" -e "s#$host#<apt-mirror-host>#g" >&2
        die "debootstrap failed"
    fi
    # Nothing in the VM reads docs, manuals, translations or apt lists; they only slow the initramfs down.
    rm -rf "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/usr/share/locale/* \
           "$dir"/var/cache/apt/* "$dir"/var/lib/apt/lists/* "$dir"/var/log/*.log "$dir"/var/cache/debconf/*-old
    tar -C "$dir" --numeric-owner -cf "$base.tmp" .
    mv "$base.tmp" "$base"
    rm -rf "$dir"; trap - EXIT
fi

self_sum=$(sha256sum "$0" | cut -c1-16)
final_key=$(printf '%s\n%s\n%s\n' "$base_key" "$KERNEL_VERSION" "$self_sum" | sha256sum | cut -c1-16)
final="$CACHE/systemd/rootfs-$final_key.tar"
if [ ! -f "$final" ]; then
    dir=$(mktemp -d "$CACHE/systemd/.customise.XXXXXX")
    trap 'rm -rf "$dir"' EXIT
    tar -C "$dir" -xpf "$base"

    # nbd.ko and the module indexes, so `modprobe nbd` resolves it.
    mdir="$dir/lib/modules/$KERNEL_VERSION"
    mkdir -p "$mdir/kernel/drivers/block"
    cp "$NBD_KO" "$mdir/kernel/drivers/block/"
    cp "$KERNEL_ROOT/lib/modules/$KERNEL_VERSION"/modules.* "$mdir/" 2>/dev/null || true
    chroot "$dir" depmod "$KERNEL_VERSION"
    grep -q 'nbd.ko' "$mdir/modules.dep" || die "depmod did not index nbd.ko"

    # Identity: hostname, hosts, a fixed machine-id (journald needs one; a fixed one keeps runs comparable).
    echo nbdvm >"$dir/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tnbdvm\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$dir/etc/hosts"
    echo 4e4244766d2d73797374656d642d7672 >"$dir/etc/machine-id"
    : >"$dir/etc/fstab"
    # Root without a password on the console, for poking at a kept image by hand.
    sed -i 's/^root:[^:]*:/root::/' "$dir/etc/shadow"

    # The kernel opens /dev/console before running init; systemd mounts devtmpfs itself afterwards.
    mkdir -p "$dir/dev"
    [ -e "$dir/dev/console" ] || mknod -m 600 "$dir/dev/console" c 5 1
    [ -e "$dir/dev/null" ] || mknod -m 666 "$dir/dev/null" c 1 3

    # Boot to multi-user and nothing that waits for a network, a login or a timer; the scenario owns ttyS0.
    ln -sf /lib/systemd/system/multi-user.target "$dir/etc/systemd/system/default.target"
    for unit in serial-getty@ttyS0.service getty@tty1.service console-getty.service getty.target \
                systemd-networkd-wait-online.service systemd-networkd.service systemd-timesyncd.service \
                apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
                nbd-server.service systemd-firstboot.service systemd-remount-fs.service \
                systemd-journald-audit.socket; do
        ln -sf /dev/null "$dir/etc/systemd/system/$unit"
    done
    # Loopback is the only network; bring it up early for every unit.
    mkdir -p "$dir/etc/systemd/system/sysinit.target.wants"
    cat >"$dir/etc/systemd/system/loopback-up.service" <<'UNIT'
[Unit]
Description=Bring up loopback (the VM has no NIC)
DefaultDependencies=no
Before=sysinit.target

[Service]
Type=oneshot
ExecStart=/sbin/ip link set lo up
RemainAfterExit=yes
UNIT
    ln -sf ../loopback-up.service "$dir/etc/systemd/system/sysinit.target.wants/loopback-up.service"
    # Keep the journal volatile and quiet on the console; the scenario prints what it needs.
    mkdir -p "$dir/etc/systemd/journald.conf.d"
    printf '[Journal]\nStorage=volatile\nForwardToConsole=no\nForwardToWall=no\n' >"$dir/etc/systemd/journald.conf.d/vm.conf"
    mkdir -p "$dir/etc/systemd/system.conf.d"
    printf '[Manager]\nShowStatus=no\nDefaultTimeoutStartSec=60s\nDefaultTimeoutStopSec=20s\n' >"$dir/etc/systemd/system.conf.d/vm.conf"

    tar -C "$dir" --numeric-owner -cf "$final.tmp" .
    mv "$final.tmp" "$final"
    rm -rf "$dir"; trap - EXIT
    # Older customisations are superseded (~200 MB each); the base tarballs stay.
    find "$CACHE/systemd" -maxdepth 1 -name 'rootfs-*.tar' ! -path "$final" -delete
fi

echo "ROOTFS_TARBALL=$final"
echo "KERNEL_VERSION=$KERNEL_VERSION"
echo "KERNEL_IMAGE=$KERNEL_IMAGE"

#!/usr/bin/env bash
# Boots the full tier: the cached Debian rootfs (real systemd + journald) as an initramfs under qemu/TCG, with the
# daemon installed by the repository's own deploy/install.sh, and runs one scenario script as a oneshot unit once
# the system reached multi-user. The scenario's output comes back over ttyS0 (this script's stdout).
#
# usage: run.sh --scenario SCRIPT [--publish DIR] [--installer SCRIPT] [--timeout SECONDS] [--keep]
#   --publish DIR  output of `dotnet publish src/NbdDaemon -r linux-x64 --self-contained`; handed to
#                  deploy/install.sh DIR --root <rootfs>. Without it the image has no daemon.
#   --installer S  installer to run instead of the repo's deploy/install.sh (same arguments); for trying the
#                  scenario before the real installer exists. Tests never pass it.
#   --timeout S    hard limit for the whole VM run (default 300); qemu is killed after it.
#   --keep         keep the work directory (rootfs copy, initramfs) and print its path.
# Host-side facts are printed as "RESULT systemd host_<key>=<value>" lines, next to the VM's own RESULT lines.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
scenario="" publish="" installer="$repo/deploy/install.sh" timeout_s=300 keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --scenario) scenario=$2; shift 2 ;;
        --publish) publish=$2; shift 2 ;;
        --installer) installer=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
die() { echo "run.sh: $*" >&2; exit 1; }
[ -n "$scenario" ] && [ -f "$scenario" ] || die "--scenario SCRIPT is required and must exist"
[ -z "$publish" ] || [ -d "$publish" ] || die "--publish $publish is not a directory"
for tool in qemu-system-x86_64 cpio zstd tar timeout; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (apt-get install qemu-system-x86 cpio zstd)"
done

env_lines=$("$here/build-rootfs.sh") || die "build-rootfs.sh failed"
ROOTFS_TARBALL=$(sed -n 's/^ROOTFS_TARBALL=//p' <<<"$env_lines")
KERNEL_IMAGE=$(sed -n 's/^KERNEL_IMAGE=//p' <<<"$env_lines")

work=$(mktemp -d "${TMPDIR:-/tmp}/nbd-systemd-vm.XXXXXX")
[ "$keep" -eq 1 ] && echo "run.sh: keeping $work" >&2 || trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"
tar -C "$root" -xpf "$ROOTFS_TARBALL"

# The real installer, so the run proves it as well as the daemon.
if [ -n "$publish" ]; then
    if [ -f "$installer" ]; then
        if bash "$installer" "$publish" --root "$root" >"$work/install.log" 2>&1; then
            echo "RESULT systemd host_install=ok"
        else
            rc=$?
            sed 's/^/install.sh: /' "$work/install.log"
            echo "RESULT systemd host_install=failed:$rc"
        fi
    else
        echo "RESULT systemd host_install=absent"
    fi
else
    echo "RESULT systemd host_install=skipped"
fi

# The installer itself, with the files it compares against, for a scenario that uninstalls inside the VM.
if [ -f "$installer" ]; then
    mkdir -p "$root/opt/nbd-install/deploy"
    cp "$installer" "$root/opt/nbd-install/deploy/install.sh"
    cp -R "$repo/systemd" "$root/opt/nbd-install/systemd"
fi

# The scenario: a oneshot unit after multi-user, printing to the serial console, powering off whatever happens.
mkdir -p "$root/opt/vm-scenario"
cp "$scenario" "$root/opt/vm-scenario/scenario.sh"
cat >"$root/etc/systemd/system/vm-scenario.service" <<'UNIT'
[Unit]
Description=VM test scenario
After=multi-user.target

[Service]
Type=oneshot
Environment=HOME=/root
ExecStart=/bin/bash -c '/bin/bash /opt/vm-scenario/scenario.sh; echo "RESULT systemd scenario_exit=$?"; echo "RESULT systemd end=1"; sync; systemctl poweroff -f || echo o > /proc/sysrq-trigger'
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf ../vm-scenario.service "$root/etc/systemd/system/multi-user.target.wants/vm-scenario.service"

# initramfs: the kernel unpacks newc cpio; zstd decompresses faster than gzip under TCG (CONFIG_RD_ZSTD=y).
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | zstd -q -1 -T0 >"$work/initrd.zst"
echo "RESULT systemd host_initrd_bytes=$(stat -c %s "$work/initrd.zst")"

start=$(date +%s%N)
set +e
timeout -k 5 "$timeout_s" qemu-system-x86_64 -accel tcg -cpu max -m 2048 -smp 2 -nographic -no-reboot -nic none \
    -kernel "$KERNEL_IMAGE" -initrd "$work/initrd.zst" \
    -append "console=ttyS0 quiet panic=-1 rdinit=/lib/systemd/systemd systemd.show_status=0" </dev/null
rc=$?
set -e
echo "RESULT systemd host_vm_ms=$(( ($(date +%s%N) - start) / 1000000 ))"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "RESULT systemd host_vm_timeout=$timeout_s"
    exit 124
fi
echo "RESULT systemd host_qemu_exit=$rc"
exit "$rc"

#!/bin/bash
# Boot the fast-tier VM (stock Debian cloud kernel + busybox initramfs) and run one scenario in it.
#
#   run-vm.sh --script SCENARIO.sh [--add HOSTPATH[:VMPATH]]... [--bin PROGRAM]...
#             [--daemon PUBLISH_DIR] [--app PUBLISH_DIR[:VMDIR]]... [--module NAME]... [--timeout SECONDS] [--mem MB]
#
# --module copies a kernel module of the VM's kernel (e.g. sch_netem) and the modules it depends on to
# /lib/modules/extra/ (NAME.ko, NAME.dep = its direct dependencies); the scenario loads it with lib.sh's load_module.
# --app copies a published self-contained .NET app folder (default VM path /opt/<folder name>) together with the
# system libraries its native parts need (glibc, libstdc++, libgcc_s, libz, ...), like --daemon does.
# Always present in the VM: /usr/local/bin/gnu-env (the host's GNU env). `gnu-env --default-signal=INT PROG ...`
# starts PROG with SIGINT at its default disposition; a non-interactive shell starts background jobs with SIGINT
# ignored, and busybox has no tool to undo that.
#
# The serial console is copied to stdout. Exit code: the scenario's exit code when the end marker
# "@@NBDVM-END rc=N" appeared, 125 when it did not (timeout, panic, crash), 2 for usage/setup errors.
# The VM has no network device: everything talks over the VM's own loopback.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
CACHE="${NBD_VM_CACHE:-/var/cache/nbd-daemon-vm}"
script=""
timeout=300
mem=2048
adds=()
bins=()
daemon=""
apps=()
modules=()

die() { echo "run-vm: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --script) script=$2; shift 2 ;;
        --add) adds+=("$2"); shift 2 ;;
        --bin) bins+=("$2"); shift 2 ;;
        --daemon) daemon=$2; shift 2 ;;
        --app) apps+=("$2"); shift 2 ;;
        --module) modules+=("$2"); shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[ -n "$script" ] || die "--script is required"
[ -f "$script" ] || die "scenario not found: $script"
for tool in qemu-system-x86_64 cpio gzip busybox ldd; do
    command -v "$tool" >/dev/null || die "missing host tool: $tool"
done
[ -x /bin/busybox ] || die "missing /bin/busybox (Debian package busybox-static)"
file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || ldd /bin/busybox 2>&1 | grep -q 'not a dynamic' \
    || die "/bin/busybox is not static (install busybox-static)"

eval "$("$here/fetch-kernel.sh")"   # KERNEL_VERSION KERNEL_IMAGE NBD_KO KERNEL_ROOT

work=$(mktemp -d "${TMPDIR:-/tmp}/nbdvm.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- base image: busybox, /init, nbd.ko. Cached per kernel + init + busybox. -----------------------
key=$(cat "$here/init.sh" /bin/busybox "$NBD_KO" | sha256sum | cut -c1-16)
base="$CACHE/base-$KERNEL_VERSION-$key.cpio.gz"
if [ ! -f "$base" ]; then
    b="$work/base"
    mkdir -p "$b"/{bin,sbin,dev,proc,sys,tmp,run,root,etc,lib/modules,usr/bin,usr/sbin,usr/local/bin}
    cp /bin/busybox "$b/bin/busybox"
    cp "$here/init.sh" "$b/init"
    chmod 755 "$b/init"
    cp "$NBD_KO" "$b/lib/modules/nbd.ko"
    mknod -m 600 "$b/dev/console" c 5 1
    mknod -m 666 "$b/dev/null" c 1 3
    (cd "$b" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$work/base.cpio.gz"
    mv "$work/base.cpio.gz" "$base"
fi

# --- per-run overlay: programs with their libraries, the daemon, files, the scenario ----------------
o="$work/overlay"
mkdir -p "$o"

copy_file() { # HOSTPATH [VMPATH] -- dereferences symlinks
    local src=$1 dst=${2:-$1}
    mkdir -p "$o$(dirname "$dst")"
    cp -L "$src" "$o$dst"
}
copy_libs() { # ELF... -- copies what ldd lists, keeping the paths ldd names
    local f lib
    for f in "$@"; do
        ldd "$f" 2>/dev/null | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | while read -r lib; do
            [ -e "$o$lib" ] || copy_file "$lib"
        done
    done
}
is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }
copy_app_libs() { # DIR -- the libraries of every ELF file in a copied app folder
    find "$1" -type f | while read -r f; do
        if is_elf "$f"; then copy_libs "$f"; fi
    done
}
copy_bin() {
    local p
    p=$(command -v "$1") || die "program not found on host: $1"
    p=$(readlink -f "$p")
    copy_file "$p" "$(command -v "$1")"
    copy_libs "$p"
    case "$(basename "$1")" in
        nbdkit)
            local d=/usr/lib/x86_64-linux-gnu/nbdkit
            [ -d "$d" ] || die "nbdkit plugin folder missing: $d"
            for so in "$d"/plugins/*.so "$d"/filters/*.so; do
                copy_file "$so"
                copy_libs "$so"
            done ;;
    esac
}

for b in "${bins[@]+"${bins[@]}"}"; do copy_bin "$b"; done

# GNU env for --default-signal (coreutils is Essential on Debian, so it is always on the host).
genv=$(readlink -f "$(command -v env)")
"$genv" --default-signal=INT true 2>/dev/null || die "host env lacks --default-signal (needs GNU coreutils >= 8.31)"
copy_file "$genv" /usr/local/bin/gnu-env
copy_libs "$genv"

if [ -n "$daemon" ]; then
    [ -x "$daemon/nbd-daemon" ] || die "no executable nbd-daemon in publish folder: $daemon"
    mkdir -p "$o/opt"
    cp -a "$daemon" "$o/opt/nbd-daemon"
    # Self-contained app: native parts still need glibc & co. from the system.
    find "$o/opt/nbd-daemon" -type f \( -name '*.so' -o -name nbd-daemon \) | while read -r f; do
        copy_libs "$f"
    done
fi

for a in "${apps[@]+"${apps[@]}"}"; do
    src=${a%%:*}
    dst=${a#*:}
    [ "$dst" = "$a" ] && dst=/opt/$(basename "$src")
    [ -d "$src" ] || die "--app: not a folder: $src"
    mkdir -p "$o$(dirname "$dst")"
    cp -a "$src" "$o$dst"
    copy_app_libs "$o$dst"
done

for a in "${adds[@]+"${adds[@]}"}"; do
    src=${a%%:*}
    dst=${a#*:}
    [ "$dst" = "$a" ] && dst=$src
    [ -e "$src" ] || die "--add: not found: $src"
    mkdir -p "$o$(dirname "$dst")"
    cp -a "$src" "$o$dst"
done

copy_module() { # NAME -- NAME.ko of the VM's kernel, its dependencies first (modinfo names them)
    local name=$1 ko dep
    [ -e "$o/lib/modules/extra/$name.ko" ] && return 0
    command -v modinfo >/dev/null || die "missing host tool: modinfo (Debian package kmod)"
    ko=$(find "$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/kernel" -name "$name.ko" | head -n1)
    [ -n "$ko" ] || die "--module: $name.ko not found under $KERNEL_ROOT/lib/modules/$KERNEL_VERSION/kernel"
    mkdir -p "$o/lib/modules/extra"
    cp "$ko" "$o/lib/modules/extra/$name.ko"
    modinfo -F depends "$ko" | tr ',' ' ' > "$o/lib/modules/extra/$name.dep"
    for dep in $(cat "$o/lib/modules/extra/$name.dep"); do copy_module "$dep"; done
}
for m in "${modules[@]+"${modules[@]}"}"; do copy_module "$m"; done

mkdir -p "$o/usr/local/lib"
cp "$here/scenarios/lib.sh" "$o/usr/local/lib/nbdvm.sh"
cp "$script" "$o/scenario.sh"
chmod 755 "$o/scenario.sh"

# The kernel unpacks concatenated cpio archives in order; the overlay lands on top of the base.
(cd "$o" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$work/overlay.cpio.gz"
cat "$base" "$work/overlay.cpio.gz" > "$work/initrd.gz"

log="$work/serial.log"
set +e
timeout -k 5 "$timeout" qemu-system-x86_64 \
    -accel tcg -cpu max -m "$mem" -smp 2 -nographic -no-reboot -nic none \
    -kernel "$KERNEL_IMAGE" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1" </dev/null 2>&1 | tr -d '\r' | tee "$log"
qrc=${PIPESTATUS[0]}
set -e

end=$(sed -n 's/^@@NBDVM-END rc=\([0-9]*\)$/\1/p' "$log" | tail -n1)
if [ -z "$end" ]; then
    if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
        echo "run-vm: timed out after ${timeout}s without the end marker" >&2
    else
        echo "run-vm: qemu exited ($qrc) without the end marker" >&2
    fi
    exit 125
fi
exit "$end"

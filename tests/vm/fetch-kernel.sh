#!/bin/sh
# Fetch (once) the current Debian cloud kernel and extract it into the VM cache.
# Prints KEY=VALUE lines: KERNEL_VERSION, KERNEL_IMAGE (vmlinuz), NBD_KO, KERNEL_ROOT (extracted tree).
# Idempotent and safe to run concurrently (flock on the cache). Needs `apt-get update` done beforehand.
set -eu

CACHE="${NBD_VM_CACHE:-/var/cache/nbd-daemon-vm}"
mkdir -p "$CACHE"

exec 9>"$CACHE/.kernel.lock"
flock 9

# The metapackage names the current ABI version: "Depends: linux-image-6.1.0-NN-cloud-amd64".
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
      | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)
if [ -z "$pkg" ]; then
    # No apt metadata (offline): fall back to whatever is already cached.
    latest=$(ls -d "$CACHE"/kernel/*/ 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$latest" ]; then
        echo "fetch-kernel: cannot resolve linux-image-cloud-amd64 (run apt-get update) and nothing cached in $CACHE" >&2
        exit 1
    fi
    ver=$(basename "$latest")
else
    ver=${pkg#linux-image-}
fi

root="$CACHE/kernel/$ver"
vmlinuz="$root/boot/vmlinuz-$ver"
nbdko="$root/lib/modules/$ver/kernel/drivers/block/nbd.ko"

if [ ! -f "$root/.complete" ]; then
    tmp=$(mktemp -d "$CACHE/.dl.XXXXXX")
    chmod 755 "$tmp"   # apt downloads as _apt when it can
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download "linux-image-$ver" >&2)
    deb=$(ls "$tmp"/*.deb)
    mkdir -p "$tmp/x"
    dpkg-deb -x "$deb" "$tmp/x"
    rm -rf "$root"
    mkdir -p "$CACHE/kernel"
    mv "$tmp/x" "$root"
    touch "$root/.complete"
fi

for f in "$vmlinuz" "$nbdko"; do
    if [ ! -f "$f" ]; then
        echo "fetch-kernel: expected file missing: $f" >&2
        exit 1
    fi
done

echo "KERNEL_VERSION=$ver"
echo "KERNEL_ROOT=$root"
echo "KERNEL_IMAGE=$vmlinuz"
echo "NBD_KO=$nbdko"

#!/usr/bin/env bash
# Installs a published nbd-daemon. Idempotent: safe to run again after every publish.
# Usage: deploy/install.sh [PUBLISH_DIR] [--root DESTDIR]
#   PUBLISH_DIR  output of deploy/publish.sh (default: ./publish/nbd-daemon)
#   --root DIR   install below DIR instead of / (packaging, tests); no systemctl calls then.
# Never overwrites /etc/nbd-daemon/appsettings.json: the admin's configuration wins.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
publish_dir="$repo_root/publish/nbd-daemon"
root=""

while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="${2:?--root needs a directory}"; shift 2 ;;
    --root=*) root="${1#--root=}"; shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option $1" >&2; exit 64 ;;
    *) publish_dir="$1"; shift ;;
  esac
done

if [ ! -x "$publish_dir/nbd-daemon" ]; then
  echo "install.sh: $publish_dir/nbd-daemon not found; run deploy/publish.sh first" >&2
  exit 66
fi

lib_dir="$root/usr/local/lib/nbd-daemon"
unit_dir="$root/etc/systemd/system"
modules_dir="$root/etc/modules-load.d"
modprobe_dir="$root/etc/modprobe.d"
config_dir="$root/etc/nbd-daemon"

install -d -m 0755 "$lib_dir" "$unit_dir" "$modules_dir" "$modprobe_dir" "$config_dir"
# The whole publish output (single file plus appsettings.json defaults and README), copied beside the installed files
# and then renamed over them: a running nbd-daemon keeps its old inode until it restarts, where copying onto it fails
# with "Text file busy" half-way through an upgrade.
stage=$(mktemp -d "$lib_dir/.install.XXXXXX")
trap 'rm -rf "$stage"' EXIT
cp -a "$publish_dir/." "$stage/"
chmod 0755 "$stage/nbd-daemon"
(cd "$stage" && find . -mindepth 1 -type d -print0) | while IFS= read -r -d '' d; do install -d -m 0755 "$lib_dir/$d"; done
(cd "$stage" && find . -mindepth 1 ! -type d -print0) | while IFS= read -r -d '' f; do mv -f "$stage/$f" "$lib_dir/$f"; done
install -m 0644 "$repo_root/systemd/nbd-daemon.service" "$unit_dir/nbd-daemon.service"
install -m 0644 "$repo_root/systemd/modules-load.d/nbd.conf" "$modules_dir/nbd.conf"
if [ ! -e "$modprobe_dir/nbd.conf" ]; then
  install -m 0644 "$repo_root/systemd/modprobe.d/nbd.conf" "$modprobe_dir/nbd.conf"
fi

if [ ! -e "$config_dir/appsettings.json" ]; then
  install -m 0600 "$repo_root/deploy/appsettings.example.json" "$config_dir/appsettings.json"
  echo "installed default configuration $config_dir/appsettings.json (edit it, then: systemctl enable --now nbd-daemon)"
else
  echo "kept existing $config_dir/appsettings.json"
fi

if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  systemctl daemon-reload
  if ! grep -qw '^nbd' /proc/modules 2>/dev/null; then
    modprobe nbd || echo "install.sh: could not load the nbd module now; it loads at boot via modules-load.d" >&2
  fi
fi

echo "installed nbd-daemon to $lib_dir"

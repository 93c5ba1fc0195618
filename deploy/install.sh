#!/usr/bin/env bash
# Installs a published nbd-daemon. Idempotent: safe to run again after every publish.
# Usage: deploy/install.sh [PUBLISH_DIR] [--root DESTDIR]
#        deploy/install.sh --uninstall [--purge] [--root DESTDIR]
#   PUBLISH_DIR  output of deploy/publish.sh (default: ./publish/nbd-daemon)
#   --root DIR   install below DIR instead of / (packaging, tests); no systemctl calls then.
#   --uninstall  stop and disable the service, remove what install.sh installed; keeps /etc/nbd-daemon
#                (--purge removes it as well).
# Never overwrites /etc/nbd-daemon/appsettings.json: the admin's configuration wins.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
publish_dir="$repo_root/publish/nbd-daemon"
root=""
uninstall=0
purge=0

while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="${2:?--root needs a directory}"; shift 2 ;;
    --root=*) root="${1#--root=}"; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option $1" >&2; exit 64 ;;
    *) publish_dir="$1"; shift ;;
  esac
done

if [ "$purge" = 1 ] && [ "$uninstall" = 0 ]; then
  echo "install.sh: --purge goes with --uninstall" >&2
  exit 64
fi

if [ "$uninstall" = 0 ] && [ ! -x "$publish_dir/nbd-daemon" ]; then
  echo "install.sh: $publish_dir/nbd-daemon not found; run deploy/publish.sh first" >&2
  exit 66
fi

if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo deploy/install.sh), or give --root DIR to install below DIR" >&2
  exit 77
fi

lib_dir="$root/usr/local/lib/nbd-daemon"
unit_dir="$root/etc/systemd/system"
modules_dir="$root/etc/modules-load.d"
modprobe_dir="$root/etc/modprobe.d"
config_dir="$root/etc/nbd-daemon"

in_use() { # PATH [PID]: a running process (other than PID) has its executable at PATH or below it
  local path exe
  path="$(readlink -f "$1")"
  for exe in /proc/[0-9]*/exe; do
    [ -n "${2:-}" ] && [ "$exe" = "/proc/$2/exe" ] && continue
    case "$(readlink -f "$exe" 2>/dev/null || true)" in
      "$path"|"$path"/*) return 0 ;;
    esac
  done
  return 1
}

systemd_here() { [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

if [ "$uninstall" = 1 ]; then
  # Nothing is touched while a daemon the service does not own runs from the library (started by hand): removing its
  # files could fail its own stop half-way, and stopping the service alone would leave the host with neither.
  refuse_running() {
    echo "install.sh: an nbd-daemon $1 runs from $lib_dir; stop it first (its devices are handled by its OnStop); nothing removed" >&2
    exit 75
  }
  service=0 main_pid=""
  if systemd_here && [ "$(systemctl show -p LoadState --value nbd-daemon.service 2>/dev/null)" = loaded ]; then
    service=1
    main_pid="$(systemctl show -p MainPID --value nbd-daemon.service 2>/dev/null || true)"
    [ "$main_pid" = 0 ] && main_pid=""
  fi
  if [ -d "$lib_dir" ] && in_use "$lib_dir" "$main_pid"; then
    refuse_running "not started by systemd"
  fi
  if [ "$service" = 1 ]; then
    # The stop does what each mapping's OnStop says (disconnect, or leave the device serving on its own).
    systemctl disable --now nbd-daemon.service || echo "install.sh: systemctl disable --now nbd-daemon failed" >&2
  fi
  if [ -d "$lib_dir" ] && in_use "$lib_dir"; then
    refuse_running "still"
  fi
  # Devices a mapping left configured (OnStop: Leave) keep serving with no daemon to reconnect them.
  for backend in /sys/block/nbd*/backend; do
    [ -z "$root" ] && [ -e "$backend" ] || continue
    case "$(cat "$backend" 2>/dev/null || true)" in
      nbd-daemon:*) echo "install.sh: warning: /dev/$(basename "$(dirname "$backend")") stays configured by nbd-daemon (OnStop: Leave), now with no daemon to reconnect it; run nbd-daemon disconnect /dev/$(basename "$(dirname "$backend")") before uninstalling, or nbd-client -d afterwards" >&2 ;;
    esac
  done
  rm -f "$unit_dir/nbd-daemon.service"
  rm -rf "$lib_dir"
  # The module files are the admin's once edited (install.sh keeps them then): removed only as shipped.
  for shipped in modules-load.d modprobe.d; do
    installed="$root/etc/$shipped/nbd.conf"
    if [ -f "$installed" ] && cmp -s "$installed" "$repo_root/systemd/$shipped/nbd.conf"; then
      rm -f "$installed"
    elif [ -e "$installed" ]; then
      echo "kept $installed (not the one this version ships: the admin's)"
    fi
  done
  if [ -d "$unit_dir/nbd-daemon.service.d" ]; then
    echo "kept $unit_dir/nbd-daemon.service.d (drop-ins are the admin's)"
  fi
  if [ "$purge" = 1 ]; then
    rm -rf "$config_dir"
  elif [ -e "$config_dir" ]; then
    echo "kept $config_dir (the configuration; --purge removes it)"
  fi
  if systemd_here; then
    systemctl daemon-reload
    systemctl reset-failed nbd-daemon.service >/dev/null 2>&1 || true
  fi
  echo "uninstalled nbd-daemon"
  exit 0
fi

install -d -m 0755 "$lib_dir" "$lib_dir/releases" "$unit_dir" "$modules_dir" "$modprobe_dir" "$config_dir"

# Each install is a release directory of its own, and `current` (what the unit starts) is switched to it in one
# rename. A running nbd-daemon keeps using its own release directory: .NET opens files by path long after the start
# (an assembly first used on the way down, its single-file bundle at the offsets it read at start), so files replaced
# under it, even by rename, could fail its stop half-way (no disconnect, no hand-over of a relay's connection).
release="$(date -u +%Y%m%d-%H%M%S)-$$"
stage="$lib_dir/releases/.$release.partial"
trap 'rm -rf "$stage"' EXIT
mkdir -m 0755 "$stage"
# Not the builder's owner or modes: files a root service runs must be root's and writable by nobody else (a build
# user able to rewrite them could run code as root), and readable by a service that keeps no CAP_DAC_OVERRIDE.
cp -R "$publish_dir/." "$stage/"
if [ "$(id -u)" = 0 ]; then
  chown -R root:root "$stage"
fi
chmod -R u=rwX,go=rX "$stage"
chmod 0755 "$stage/nbd-daemon"
mv -T "$stage" "$lib_dir/releases/$release"
ln -sfn "releases/$release" "$lib_dir/.current.new"
mv -T "$lib_dir/.current.new" "$lib_dir/current"

# Release directories nothing runs from any more go: every one but the current and those a process still executes
# from (the daemon that runs until the next restart). Same for the files of the layout before releases, which lay
# directly in $lib_dir.
for old in "$lib_dir"/releases/*; do
  [ -d "$old" ] || continue
  [ "$(basename "$old")" = "$release" ] && continue
  in_use "$old" || rm -rf "$old"
done
if [ -f "$lib_dir/nbd-daemon" ] && [ ! -L "$lib_dir/nbd-daemon" ] && ! in_use "$lib_dir"/nbd-daemon; then
  find "$lib_dir" -mindepth 1 -maxdepth 1 ! -name releases ! -name current -exec rm -rf {} +
fi

install -m 0644 "$repo_root/systemd/nbd-daemon.service" "$unit_dir/nbd-daemon.service"
# Loading the module at boot, and its options, are the admin's once installed: an edited file stays as edited.
if [ ! -e "$modules_dir/nbd.conf" ]; then
  install -m 0644 "$repo_root/systemd/modules-load.d/nbd.conf" "$modules_dir/nbd.conf"
fi
if [ ! -e "$modprobe_dir/nbd.conf" ]; then
  install -m 0644 "$repo_root/systemd/modprobe.d/nbd.conf" "$modprobe_dir/nbd.conf"
fi

# A dangling symlink (configuration management whose target is not mounted yet) is the admin's too.
if [ ! -e "$config_dir/appsettings.json" ] && [ ! -L "$config_dir/appsettings.json" ]; then
  install -m 0600 "$repo_root/deploy/appsettings.example.json" "$config_dir/appsettings.json"
  echo "installed default configuration $config_dir/appsettings.json (edit it, then: systemctl enable --now nbd-daemon)"
else
  echo "kept existing $config_dir/appsettings.json"
fi

echo "installed nbd-daemon to $lib_dir/releases/$release ($lib_dir/current)"
if [ -n "$root" ]; then
  exit 0
fi

if ! modinfo nbd >/dev/null 2>&1; then
  echo "install.sh: warning: this kernel ($(uname -r)) has no nbd module: no /dev/nbdN can be mapped until one with it runs" >&2
elif ! grep -qw '^nbd' /proc/modules 2>/dev/null; then
  modprobe nbd || echo "install.sh: could not load the nbd module now; it loads at boot via $modules_dir/nbd.conf" >&2
fi

if systemd_here; then
  systemctl daemon-reload
  if systemctl is-active --quiet nbd-daemon; then
    echo "nbd-daemon is running the release it was started with; to run this one: systemctl restart nbd-daemon"
  fi
else
  echo "systemd is not running here: start $lib_dir/current/nbd-daemon yourself (it reads $config_dir/appsettings.json)"
fi

#!/usr/bin/env bash
# Runs the README's two commands (scripts/demo.sh, then scripts/test.sh), unmodified, on a fresh
# Debian 12: a minbase chroot made with debootstrap, holding a clone of this repository's HEAD and
# nothing else but the host's CUDA toolkit (bind-mounted read-only when /usr/local/cuda exists).
# It catches what a user's machine lacks and ours has: a missing install step, a patched system
# file the build leans on. Prints how long each command took.
#
#   scripts/fresh-machine-check.sh [--keep] [--skip-tests]
#
# Needs root (debootstrap, chroot, mounts); installs debootstrap when it is missing.
# Environment: MOELAB_DEBIAN_MIRROR (default: the host's first Debian source in /etc/apt),
# MOELAB_FRESH_DIR (the chroot is a new folder made inside it and removed after; default /var/tmp).
# Exit codes: 0 both commands passed; 1 one failed (its output is above); 2 usage or setup error;
# 75 Debian's archive could not be reached (nothing was checked: callers may treat it as a warning).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

keep=0
skip_tests=0
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    --skip-tests) skip_tests=1 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fresh-machine-check: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" != 0 ]; then
  echo "fresh-machine-check: needs root (debootstrap, chroot and bind mounts); run it with sudo" >&2
  exit 2
fi

# The Debian mirror this host already uses, so the check reaches the same archive apt does.
host_mirror() {
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' |
        grep -v -e security -e '^$' | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
          awk '$3 ~ /^bookworm$/ {print $2; exit}' || true)
  fi
  echo "$uri"
}
mirror=${MOELAB_DEBIAN_MIRROR:-$(host_mirror)}
if [ -z "$mirror" ]; then
  echo "fresh-machine-check: no Debian mirror found in /etc/apt; set MOELAB_DEBIAN_MIRROR" >&2
  exit 2
fi

if ! command -v debootstrap >/dev/null; then
  echo "fresh-machine-check: installing debootstrap"
  apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null || {
    echo "fresh-machine-check: warning: could not install debootstrap (no package archive?); nothing checked" >&2
    exit 75
  }
fi

# Reachability first, so an offline machine is told apart from a broken check.
probe=$(mktemp)
if ! timeout 60 /usr/lib/apt/apt-helper download-file "$mirror/dists/bookworm/Release" "$probe" >/dev/null 2>&1; then
  rm -f "$probe"
  echo "fresh-machine-check: warning: Debian's archive ($mirror) cannot be reached; nothing checked" >&2
  exit 75
fi
rm -f "$probe"

parent=${MOELAB_FRESH_DIR:-/var/tmp}
mkdir -p "$parent"
root=$(mktemp -d "$parent/moelab-fresh.XXXXXX")  # always a new folder: cleanup removes it whole
mounts=()
cleanup() {
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    umount -R "${mounts[i]}" 2>/dev/null || umount -l "${mounts[i]}" 2>/dev/null || true
  done
  if ((keep)); then
    echo "fresh-machine-check: kept the chroot at $root"
  else
    # Only ever delete a tree with nothing mounted inside it.
    if ! grep -q " $root/" /proc/mounts; then rm -rf "$root"; fi
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log="$root.debootstrap.log"
echo "fresh-machine-check: debootstrap --variant=minbase bookworm into $root"
start=$(date +%s)
if ! debootstrap --variant=minbase bookworm "$root" "$mirror" >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  rm -f "$log"
  echo "fresh-machine-check: debootstrap failed (its log's end is above)" >&2
  exit 1
fi
rm -f "$log"
echo "fresh-machine-check: minbase Debian 12 made in $(( $(date +%s) - start )) s"

bind() {  # bind SRC DST [ro]
  mkdir -p "$2"
  mount --rbind "$1" "$2"
  mount --make-rslave "$2"
  mounts+=("$2")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}
mount -t proc proc "$root/proc"; mounts+=("$root/proc")
bind /sys "$root/sys"
bind /dev "$root/dev"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
if [ -d /usr/local/cuda ]; then
  bind "$(readlink -f /usr/local/cuda)" "$root/usr/local/cuda" ro
  echo "fresh-machine-check: the host's CUDA toolkit at /usr/local/cuda, read-only"
fi

# What a user has: a clone of the committed tree (work in progress is not what they get).
git clone --quiet --no-hardlinks "$repo" "$root/root/moelab"
echo "fresh-machine-check: cloned $(git -C "$repo" rev-parse --short HEAD) into the chroot"

in_chroot() {
  chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash -c "cd /root/moelab && $1"
}
run_timed() {  # run_timed NAME COMMAND
  local t0 rc
  echo "fresh-machine-check: $2"
  t0=$(date +%s)
  set +e
  in_chroot "$2"
  rc=$?
  set -e
  times+=("$1 $(( $(date +%s) - t0 )) s (exit $rc)")
  if ((rc != 0)); then
    echo "fresh-machine-check: FAILED: '$2' exited $rc on a fresh Debian 12" >&2
    printf '  %s\n' "${times[@]}" >&2
    exit 1
  fi
}
times=()
run_timed demo "scripts/demo.sh"
((skip_tests)) || run_timed tests "scripts/test.sh"
echo "fresh-machine-check: passed on a fresh Debian 12 with stock CMake:"
printf '  %s\n' "${times[@]}"

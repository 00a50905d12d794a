#!/usr/bin/env bash
# Runs one statically linked program inside a small qemu guest whose Debian
# kernel has kernel TLS (tls.ko), streams the program's output to stdout and
# exits with the program's exit status.
#
#   bash scripts/ktls-vm.sh path/to/static-binary [args...]
#   bash scripts/ktls-vm.sh --host-root [--cwd DIR] /host/path/program [args...]
#   bash scripts/ktls-vm.sh --fetch      only download and cache the kernel
#
# --host-root: the guest mounts this machine's root file system read-only
# over 9p (virtio) and runs the program chrooted into it (dynamically
# linked programs, e.g. /usr/bin/python3 with Debian's packages), with
# fresh /proc, /sys, /dev and a tmpfs on /run (TMPDIR and HOME point
# there), in DIR (default: the current directory). Nothing it writes stays.
#
# Why: this host's kernel has no CONFIG_TLS, so kTLS can only be exercised in
# a guest. The guest is emulated (TCG; /dev/kvm is not usable here), boots in
# a few seconds and runs nothing but an initramfs: busybox, the crypto and tls
# modules loaded in dependency order, loopback up, the program, an exit line
# on the serial console, power off. The program gets the environment variable
# KLOOP_REQUIRE_KTLS=1 so that it can treat a missing TLS ULP as a failure.
#
# The kernel is Debian's linux-image-<version>-amd64 (the one the metapackage
# linux-image-amd64 of the configured apt sources depends on), fetched once
# with `apt-get download` and cached, vmlinuz plus the few modules needed, in
#   ${KLOOP_KTLS_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kloop/ktls-vm}
# The cached kernel is reused for later runs, also offline; delete the cache
# directory (or set KLOOP_KTLS_VM_KERNEL) to change it.
#
# Exit status: the program's, or
#   2    bad usage or the program is not a static executable
#   3    qemu, busybox, cpio or the kernel is missing and cannot be fetched
#   4    the guest stopped without reporting the program's exit status
#        (kernel panic, program killed, console lost); its console is shown
#   124  the guest ran longer than the timeout and was killed
# Environment:
#   KLOOP_KTLS_VM_TIMEOUT  seconds before the guest is killed (default 240)
#   KLOOP_KTLS_VM_KERNEL   Debian kernel image package to use
#                          (default: what linux-image-amd64 depends on)
#   KLOOP_KTLS_VM_CACHE    cache directory (default above)
#   KLOOP_KTLS_VM_MEMORY   guest memory (default 512M)
#   KLOOP_KTLS_VM_CPUS     guest CPUs (default 1)
set -uo pipefail

TIMEOUT=${KLOOP_KTLS_VM_TIMEOUT:-240}
CACHE=${KLOOP_KTLS_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/kloop/ktls-vm}
MEMORY=${KLOOP_KTLS_VM_MEMORY:-512M}
CPUS=${KLOOP_KTLS_VM_CPUS:-1}
# Loaded in this order: each one's dependencies come before it (modinfo
# -F depends), and the AEAD the tls module asks the crypto API for (gcm(aes))
# must be available without a modprobe in the guest.
MODULES=(gf128mul ghash-generic gcm ctr cryptd crypto_simd aesni-intel tls)
# With --host-root: virtio and 9p, to mount the host's root read-only.
HOST_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
  9pnet 9pnet_virtio netfs fscache 9p)

die() {
  local code=$1
  shift
  printf 'ktls-vm: %s\n' "$*" >&2
  exit "$code"
}
log() { printf 'ktls-vm: %s\n' "$*" >&2; }

usage() {
  sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

[ $# -ge 1 ] || usage
case $1 in -h | --help) usage ;; esac

for tool in qemu-system-x86_64 busybox cpio; do
  command -v "$tool" >/dev/null ||
    die 3 "$tool is not installed (apt-get install qemu-system-x86 busybox-static cpio kmod; scripts/setup.sh does it)"
done
BUSYBOX=$(command -v busybox)
if LC_ALL=C readelf -l "$BUSYBOX" 2>/dev/null | grep -q INTERP; then
  die 3 "$BUSYBOX is not a static busybox (apt-get install busybox-static)"
fi

# The kernel image package: explicit, or what the metapackage depends on.
kernel_package() {
  if [ -n "${KLOOP_KTLS_VM_KERNEL:-}" ]; then
    echo "$KLOOP_KTLS_VM_KERNEL"
    return
  fi
  LC_ALL=C apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}

# fetch_kernel PACKAGE DIR: downloads PACKAGE, keeps vmlinuz and MODULES.
fetch_kernel() {
  local pkg=$1 dir=$2 tmp attempt deb release m path
  command -v apt-get >/dev/null || die 3 "no apt-get: cannot download $pkg"
  tmp=$(mktemp -d) || die 3 "mktemp failed"
  # apt drops to the _apt user for downloads; let it write there.
  chmod 0777 "$tmp"
  for attempt in 1 2 3; do
    (cd "$tmp" && apt-get download -q "$pkg" </dev/null >&2) && break
    if [ "$attempt" -eq 1 ] && [ "$(id -u)" -eq 0 ]; then
      log "apt-get download $pkg failed: refreshing the package lists"
      apt-get update -q </dev/null >&2 || true
    else
      sleep $((attempt * 5))
    fi
  done
  deb=$(find "$tmp" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
  if [ -z "$deb" ]; then
    rm -rf "$tmp"
    die 3 "could not download $pkg with apt-get (network or apt sources?)"
  fi
  mkdir -p "$tmp/x" && dpkg-deb -x "$deb" "$tmp/x" || {
    rm -rf "$tmp"
    die 3 "dpkg-deb -x $deb failed"
  }
  release=$(basename "$(find "$tmp/x/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)")
  mkdir -p "$dir.new/modules"
  cp "$tmp/x/boot/vmlinuz-$release" "$dir.new/vmlinuz" || {
    rm -rf "$tmp" "$dir.new"
    die 3 "$pkg has no boot/vmlinuz-$release"
  }
  for m in "${MODULES[@]}" "${HOST_MODULES[@]}"; do
    path=$(find "$tmp/x/lib/modules/$release" -name "$m.ko*" | head -n1)
    if [ -z "$path" ]; then
      rm -rf "$tmp" "$dir.new"
      die 3 "$pkg has no module $m"
    fi
    cp "$path" "$dir.new/modules/"
  done
  echo "$release" >"$dir.new/release"
  rm -rf "$tmp" "$dir"
  mv "$dir.new" "$dir"
  log "cached $pkg ($release) in $dir"
}

# Whether a cached kernel has every module this script loads (a cache made
# by an older version of it may lack some: fetched again then).
cache_complete() {
  local m
  for m in "${MODULES[@]}" "${HOST_MODULES[@]}"; do
    compgen -G "$1/modules/$m.ko*" >/dev/null || return 1
  done
}

# The cached kernel: the one named in $CACHE/current, or a new download.
ensure_kernel() {
  local pkg
  mkdir -p "$CACHE" || die 3 "cannot create $CACHE"
  if [ -z "${KLOOP_KTLS_VM_KERNEL:-}" ] && [ -s "$CACHE/current" ] &&
    [ -f "$CACHE/$(cat "$CACHE/current")/release" ] &&
    cache_complete "$CACHE/$(cat "$CACHE/current")"; then
    KDIR=$CACHE/$(cat "$CACHE/current")
    return
  fi
  pkg=$(kernel_package)
  [ -n "$pkg" ] ||
    die 3 "no Debian kernel package found (apt-cache depends linux-image-amd64 is empty: run apt-get update)"
  if [ ! -f "$CACHE/$pkg/release" ] || ! cache_complete "$CACHE/$pkg"; then
    log "downloading $pkg (once)"
    fetch_kernel "$pkg" "$CACHE/$pkg"
  fi
  [ -n "${KLOOP_KTLS_VM_KERNEL:-}" ] || echo "$pkg" >"$CACHE/current"
  KDIR=$CACHE/$pkg
}

ensure_kernel
[ "$1" = --fetch ] && exit 0

HOST_ROOT=0
GUEST_CWD=$PWD
if [ "$1" = --host-root ]; then
  HOST_ROOT=1
  shift
  if [ "${1:-}" = --cwd ]; then
    [ $# -ge 2 ] || usage
    GUEST_CWD=$2
    shift 2
  fi
  [ $# -ge 1 ] || usage
fi
PROGRAM=$1
shift
[ -f "$PROGRAM" ] && [ -x "$PROGRAM" ] || die 2 "$PROGRAM is not an executable file"
if [ "$HOST_ROOT" = 0 ] && LC_ALL=C readelf -l "$PROGRAM" 2>/dev/null | grep -q 'INTERP'; then
  die 2 "$PROGRAM is dynamically linked; the guest has no libraries: link it with -static (or use --host-root)"
fi

WORK=$(mktemp -d) || die 3 "mktemp failed"
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

# A marker no program output can guess, so that only init's lines count.
TOKEN=kloop-ktls-vm-$RANDOM$RANDOM

# The initramfs: busybox, the modules, the program and an init script.
ROOTFS=$WORK/root
mkdir -p "$ROOTFS"/{bin,dev,proc,sys,tmp,run,lib/modules} || die 3 "cannot build the initramfs"
cp "$BUSYBOX" "$ROOTFS/bin/busybox"
LOAD=("${MODULES[@]}")
[ "$HOST_ROOT" = 1 ] && LOAD+=("${HOST_MODULES[@]}")
for m in "${LOAD[@]}"; do
  cp "$KDIR"/modules/"$m".ko* "$ROOTFS/lib/modules/"
done
if [ "$HOST_ROOT" = 1 ]; then
  # Run on the host's root: a small wrapper mounts it and chroots.
  cat >"$ROOTFS/bin/program" <<WRAPPER
#!/bin/busybox sh
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /host || exit 125
# /tmp stays the host's (read-only: the program may live there); the
# writable scratch space is a tmpfs on /run, named by TMPDIR and HOME.
mount -t proc proc /host/proc && mount -t sysfs sysfs /host/sys &&
  mount -t devtmpfs devtmpfs /host/dev && mount -t tmpfs tmpfs /host/run || exit 125
export TMPDIR=/run HOME=/run
exec chroot /host /bin/sh -c 'cd "\$0" && exec "\$@"' '$GUEST_CWD' '$PROGRAM' "\$@"
WRAPPER
  chmod 0755 "$ROOTFS/bin/program"
else
  cp "$PROGRAM" "$ROOTFS/bin/program"
fi
{
  # The program's arguments, each quoted for the guest's sh.
  printf 'set --'
  for arg in "$@"; do
    printf " '%s'" "${arg//\'/\'\\\'\'}"
  done
  printf '\n'
} >"$ROOTFS/args"
cat >"$ROOTFS/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
# TERM=dumb: no colour codes in the output a caller may parse.
export PATH=/bin HOME=/tmp TMPDIR=/tmp TERM=dumb KLOOP_REQUIRE_KTLS=1 PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
for m in ${LOAD[*]}; do
  insmod /lib/modules/\$m.ko* || echo "$TOKEN: insmod \$m failed"
done
ip link set lo up
. /args
echo "$TOKEN: start"
cd /tmp
/bin/program "\$@"
echo "$TOKEN: exit \$?"
sync
poweroff -f
EOF
chmod 0755 "$ROOTFS/init"
(cd "$ROOTFS" && find . | cpio -o -H newc --quiet | gzip -1 >"$WORK/initrd.gz") ||
  die 3 "cpio of the initramfs failed"

VIRTFS=()
[ "$HOST_ROOT" = 1 ] &&
  VIRTFS=(-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")

# The guest. Console on the first serial port only; the kernel's own messages
# are kept to errors. panic=-1 with -no-reboot makes a panic end qemu.
CONSOLE=$WORK/console.log
STATUS=$WORK/status
timeout --kill-after=10 "$TIMEOUT" \
  qemu-system-x86_64 -machine q35,accel=tcg -cpu max -smp "$CPUS" -m "$MEMORY" \
  -nodefaults -no-user-config -display none -serial stdio -no-reboot \
  -kernel "$KDIR/vmlinuz" -initrd "$WORK/initrd.gz" "${VIRTFS[@]}" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init" \
  </dev/null 2>"$WORK/qemu.err" |
  tee "$CONSOLE" |
  awk -v token="$TOKEN" -v status="$STATUS" '
    { sub(/\r$/, "") }
    $0 == token ": start" { running = 1; next }
    index($0, token ": exit ") == 1 {
      print substr($0, length(token) + 8) > status
      running = 0
      next
    }
    index($0, token ": ") == 1 { print "ktls-vm: guest: " substr($0, length(token) + 3) > "/dev/stderr"; next }
    running { print; fflush() }
  '
rc=${PIPESTATUS[0]}

if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  log "the guest ran longer than ${TIMEOUT}s and was killed (KLOOP_KTLS_VM_TIMEOUT); last console lines:"
  tail -n 20 "$CONSOLE" | tr -d '\r' >&2
  exit 124
fi
if [ ! -s "$STATUS" ]; then
  log "the guest stopped without the program's exit status (qemu exited $rc); console:"
  tail -n 40 "$CONSOLE" | tr -d '\r' >&2
  [ -s "$WORK/qemu.err" ] && cat "$WORK/qemu.err" >&2
  exit 4
fi
exit "$(cat "$STATUS")"

#!/usr/bin/env bash
# Prepares the Soft-RoCE testbed (see tests/testbed/README.md). Idempotent; needs root.
#
#   1. apt-get installs qemu, busybox-static, the RDMA user space and perftest (what is missing);
#   2. downloads the Debian kernel package that `linux-image-amd64` depends on
#      (`apt-get download`) and unpacks it with `dpkg -x` into the cache dir;
#   3. builds an initramfs: static busybox + the kernel modules below + tests/testbed/init.sh
#      as /init.
#
# Cache dir: $HACSERVE_TESTBED_DIR, default <repo>/target/testbed. It ends up holding
#   vmlinuz  initramfs.cpio.gz  kernel/<package>.deb  kernel-version  stamp
# A second run with nothing changed only checks and prints "up to date".
# HACSERVE_TESTBED_REFRESH=1 forgets the cached kernel and fetches the current one.
set -euo pipefail

t0=$(date +%s.%N)
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dir=${HACSERVE_TESTBED_DIR:-$repo/target/testbed}
export DEBIAN_FRONTEND=noninteractive

say() { echo "setup.sh: $*"; }
die() { echo "setup.sh: ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get install, mknod in the initramfs)"

# Modules, inserted in this order by /init: the list that shared/softroce.md found enough
# (crc32_generic must come before rdma_rxe), plus overlay, which makes the guest's /tmp the
# host's /tmp with a writable tmpfs layer on top, and for the two-VM testbed (run-in-2vm.sh)
# failover, net_failover, virtio_net (the guests' link) and sch_netem (tc netem faults on it).
# Built-in ones are skipped.
modules=(crc32_generic virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
  9pnet 9pnet_virtio netfs fscache 9p ib_core ib_uverbs udp_tunnel ip6_udp_tunnel rdma_rxe
  configfs iw_cm ib_cm rdma_cm rdma_ucm dummy veth overlay failover net_failover virtio_net
  sch_netem)

# ---- 1. packages --------------------------------------------------------------------------
packages=(qemu-system-x86 busybox-static cpio kmod rdma-core ibverbs-providers ibverbs-utils
  rdmacm-utils perftest iproute2 libibverbs-dev librdmacm-dev)
missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$p")
done
apt_updated=0
if [ ${#missing[@]} -gt 0 ]; then
  say "installing: ${missing[*]}"
  apt-get update -q
  apt_updated=1
  extra=()
  # The machine image ships qemu-utils (qemu-img) from bookworm-backports (10.x), which cannot
  # live beside bookworm's qemu-system-x86 (7.2): apt would remove it. Swap it for bookworm's
  # qemu-utils instead, so that qemu-img stays on the machine.
  utils_ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  sys_ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
  if [ -n "$utils_ver" ] && [ -n "$sys_ver" ] && [ "$utils_ver" != "$sys_ver" ] &&
    [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
    say "qemu-utils $utils_ver would be removed by qemu-system-x86 $sys_ver: installing qemu-utils=$sys_ver"
    extra=("qemu-utils=$sys_ver" --allow-downgrades)
  fi
  apt-get install -y -q --no-install-recommends "${missing[@]}" "${extra[@]}"
else
  say "packages: all ${#packages[@]} installed"
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not on PATH after install"
busybox=$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -n1)
[ -x "$busybox" ] || die "busybox-static installed but its binary was not found"

# ---- 2. kernel ----------------------------------------------------------------------------
# The .deb is kept in $dir/kernel/ (about 70 MB); it is unpacked into a temporary dir only
# while the initramfs is (re)built, since the unpacked tree is about 400 MB.
mkdir -p "$dir/kernel"
if [ "${HACSERVE_TESTBED_REFRESH:-0}" = 1 ]; then
  say "HACSERVE_TESTBED_REFRESH=1: dropping the cached kernel"
  rm -rf "$dir/kernel" "$dir/kernel-version" "$dir/vmlinuz" "$dir/initramfs.cpio.gz" "$dir/stamp"
  mkdir -p "$dir/kernel"
fi

# A kernel fetched by an earlier run is reused (no network); otherwise fetch the one that
# linux-image-amd64 points at.
kpkg="" kdeb=""
if [ -f "$dir/kernel-version" ]; then
  read -r kpkg kdeb <"$dir/kernel-version" || true
  if [ -z "${kpkg:-}" ] || [ ! -f "$dir/kernel/${kdeb:-none}" ]; then
    kpkg=""
  fi
fi
if [ -z "$kpkg" ]; then
  find_kpkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
      awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
  }
  kpkg=$(find_kpkg)
  if [ -z "$kpkg" ] && [ $apt_updated = 0 ]; then
    apt-get update -q
    apt_updated=1
    kpkg=$(find_kpkg)
  fi
  [ -n "$kpkg" ] || die "could not resolve the package that linux-image-amd64 depends on"
  dl=$(mktemp -d "$dir/download.XXXXXX")
  chmod 755 "$dl"
  chown _apt "$dl" 2>/dev/null || true # apt-get download drops to the _apt user
  say "downloading $kpkg"
  if ! (cd "$dl" && apt-get download -q "$kpkg"); then
    [ $apt_updated = 0 ] || die "apt-get download $kpkg failed"
    apt-get update -q
    apt_updated=1
    (cd "$dl" && apt-get download -q "$kpkg") || die "apt-get download $kpkg failed"
  fi
  deb=$(ls "$dl"/*.deb)
  kdeb=$(basename "$deb")
  say "downloaded $kdeb ($(du -h "$deb" | cut -f1))"
  rm -f "$dir"/kernel/*.deb
  mv "$deb" "$dir/kernel/$kdeb"
  rm -rf "$dl"
  echo "$kpkg $kdeb" >"$dir/kernel-version"
else
  say "kernel: reusing $dir/kernel/$kdeb"
fi

# ---- 3. initramfs -------------------------------------------------------------------------
# Rebuilt when the kernel, busybox, the module list or init.sh change.
stamp_now=$(
  {
    echo "$kpkg $kdeb"
    sha256sum "$busybox" "$here/init.sh"
    echo "${modules[*]}"
  } | sha256sum | cut -d' ' -f1
)
if [ -f "$dir/initramfs.cpio.gz" ] && [ -f "$dir/vmlinuz" ] && [ -f "$dir/stamp" ] &&
  [ "$(cat "$dir/stamp")" = "$stamp_now" ]; then
  say "initramfs: up to date ($dir/initramfs.cpio.gz)"
else
  work=$(mktemp -d "$dir/build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  kroot=$work/kernel
  dpkg -x "$dir/kernel/$kdeb" "$kroot"
  kver=$(ls "$kroot/lib/modules" | head -n1)
  [ -n "$kver" ] || die "no lib/modules/<version> in $kdeb"
  vmlinuz=$kroot/boot/vmlinuz-$kver
  [ -f "$vmlinuz" ] || die "no boot/vmlinuz-$kver in $kdeb"
  moddir=$kroot/lib/modules/$kver
  say "unpacked $kdeb: kernel $kver"

  stage=$work/initramfs
  mkdir -p "$stage"/{bin,sbin,dev,proc,sys,newroot,results,lib/modules,etc}
  cp "$busybox" "$stage/bin/busybox"
  for applet in $("$busybox" --list); do
    [ -e "$stage/bin/$applet" ] || ln -s busybox "$stage/bin/$applet"
  done
  mknod -m 600 "$stage/dev/console" c 5 1
  mknod -m 666 "$stage/dev/null" c 1 3
  : >"$stage/etc/modules.order"
  for m in "${modules[@]}"; do
    # Module files use either _ or - in their names; look for both.
    alt=${m//_/-}
    f=$(find "$moddir/kernel" \( -name "$m.ko*" -o -name "$alt.ko*" \) | head -n1)
    if [ -z "$f" ]; then
      if grep -qE "/($m|$alt)\.ko$" "$moddir/modules.builtin" 2>/dev/null; then
        say "module $m: built into the kernel, skipped"
        continue
      fi
      die "module $m: neither a .ko under $moddir nor built in"
    fi
    case "$f" in
      *.ko) cp "$f" "$stage/lib/modules/$m.ko" ;;
      *.ko.xz) xz -dc "$f" >"$stage/lib/modules/$m.ko" ;;
      *.ko.zst) zstd -dcq "$f" >"$stage/lib/modules/$m.ko" ;;
      *.ko.gz) gzip -dc "$f" >"$stage/lib/modules/$m.ko" ;;
      *) die "module $m: unknown format $f" ;;
    esac
    echo "$m" >>"$stage/etc/modules.order"
  done
  echo "$kver" >"$stage/etc/kernel-version"
  cp "$here/init.sh" "$stage/init"
  chmod 755 "$stage/init"
  (cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet | gzip -6) \
    >"$dir/initramfs.cpio.gz.tmp"
  mv "$dir/initramfs.cpio.gz.tmp" "$dir/initramfs.cpio.gz"
  cp "$vmlinuz" "$dir/vmlinuz.tmp"
  mv "$dir/vmlinuz.tmp" "$dir/vmlinuz"
  echo "$stamp_now" >"$dir/stamp"
  loaded=$(tr '\n' ' ' <"$stage/etc/modules.order")
  rm -rf "$work"
  trap - EXIT
  say "initramfs: built $dir/initramfs.cpio.gz ($(du -h "$dir/initramfs.cpio.gz" | cut -f1))"
  say "initramfs: busybox + modules: $loaded"
fi

say "ready: $kpkg, $dir/vmlinuz + $dir/initramfs.cpio.gz; took $(elapsed) s"

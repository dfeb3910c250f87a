#!/usr/bin/env bash
# Runs a release tarball's binaries on an older glibc than the build machine's: a minimal
# Debian root (default suite bullseye, glibc 2.31, Ubuntu 20.04's) made once with
# `debootstrap --variant=minbase` and kept, then scripts/check_release.sh --run-only inside it
# (every --help, --version and --check; gen_models + zmq_server + zmq_client on loopback).
# The root is entered with a user-namespace chroot (`unshare -r -m`, /proc and /dev bound in),
# so it needs no root-only network set-up; loopback is the host's.
#
# Usage: scripts/check_old_glibc.sh dist/hacserve-<version>-x86_64-linux.tar.gz
# Environment: HACSERVE_OLD_ROOT (where the root is kept; default
# ${XDG_CACHE_HOME:-~/.cache}/hacserve/<suite>-root), HACSERVE_OLD_SUITE (default bullseye;
# buster, glibc 2.28, only where a mirror still serves it), HACSERVE_DEBIAN_MIRROR (default: the
# first Debian mirror of this machine's apt sources).
# Needs: debootstrap (apt-get install debootstrap), unshare (util-linux).
set -euo pipefail
tarball=$(realpath "${1:?usage: check_old_glibc.sh <tarball>}")
here=$(cd "$(dirname "$0")" && pwd)
suite=${HACSERVE_OLD_SUITE:-bullseye}
root=${HACSERVE_OLD_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/hacserve/$suite-root}

apt_mirror() {
  # deb822 sources ("URIs: ...") first, then one-line ones ("deb URL suite ...").
  cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs: *//p' | tr ' ' '\n'
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '$1 == "deb" { print ($2 ~ /^\[/ ? $3 : $2) }'
}
if [ ! -x "$root/bin/bash" ]; then
  command -v debootstrap >/dev/null || { echo "check_old_glibc.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
  mirror=${HACSERVE_DEBIAN_MIRROR:-$(apt_mirror | grep -v security | grep -m1 '/debian/*$' || true)}
  [ -n "$mirror" ] || { echo "check_old_glibc.sh: no Debian mirror in the apt sources; set HACSERVE_DEBIAN_MIRROR" >&2; exit 2; }
  echo "check_old_glibc.sh: debootstrap --variant=minbase $suite $root $mirror"
  mkdir -p "$(dirname "$root")"
  rm -rf "$root.partial"
  debootstrap --variant=minbase "$suite" "$root.partial" "$mirror" > "$root.log" 2>&1 \
    || { echo "check_old_glibc.sh: debootstrap failed, see $root.log" >&2; tail -n5 "$root.log" >&2; exit 2; }
  mv "$root.partial" "$root"
fi

inside=/hacserve-check
rm -rf "${root:?}$inside"
mkdir -p "$root$inside"
cp "$tarball" "$here/check_release.sh" "$root$inside/"
name=$(basename "$tarball")
echo "check_old_glibc.sh: running $name in $root ($suite)"
status=0
unshare -r -m /bin/sh -c '
  set -e
  mount --rbind /proc "$1/proc"
  mount --rbind /dev "$1/dev"
  exec chroot "$1" /usr/bin/env -i PATH=/usr/bin:/bin TMPDIR=/tmp /bin/bash -c "ldd --version | head -n1; $2/check_release.sh --run-only $2/$3"
' sh "$root" "$inside" "$name" || status=$?
rm -rf "${root:?}$inside"
if [ "$status" -ne 0 ]; then
  echo "check_old_glibc.sh: FAILED in $suite (exit $status)" >&2
  exit "$status"
fi
echo "check_old_glibc.sh: all checks passed in $suite"

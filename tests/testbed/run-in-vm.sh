#!/usr/bin/env bash
# Runs CMD inside a qemu VM that has a Soft-RoCE device (rxe0 on dummy0, 192.0.2.1/24), chrooted
# into this machine's root filesystem (shared read-only over 9p), in the current directory.
#
#   tests/testbed/run-in-vm.sh CMD [ARGS...]
#   tests/testbed/run-in-vm.sh sh -c 'server & sleep 1; client 192.0.2.1'   # several commands
#   tests/testbed/run-in-vm.sh sh path/to/script.sh                         # a script
#
# stdout: the guest console. CMD's own output sits between the lines HACSERVE_TESTBED_BEGIN and
# HACSERVE_TESTBED_EXIT=<n>. Exit status: CMD's. If the VM never got to run CMD, or died or
# timed out before CMD ended, a message starting with "run-in-vm: ERROR" goes to stderr and the
# status is 125 (testbed failure) or 124 (timeout).
#
# How the status comes back: the host creates a run dir (mktemp), shares it read-write with the
# guest (9p tag "results"); /init writes CMD's exit status to <run dir>/exit after CMD ends, syncs
# and unmounts before powering off, and this script exits with it. Only that file counts: the
# console markers are for people and for callers that want to cut CMD's output out of the
# console (console lines can carry kernel messages or be faked by CMD's own output).
# The command goes the other way: <run dir>/cmd.sh (env, cd, exec CMD), read by the guest.
#
# Inside the guest:
#   - the host root is read-only; /tmp is the host's /tmp under a writable tmpfs layer
#     (overlayfs: host files readable, guest writes thrown away); /var/tmp, /run, /dev/shm are
#     empty tmpfs;
#   - $HACSERVE_TESTBED_OUT is a writable dir; what CMD writes there is copied to the host dir
#     named by $HACSERVE_TESTBED_OUT on the host, if set (else thrown away);
#   - environment: PATH, HOME, USER, LANG, LC_ALL, TERM, RUST_LOG, RUST_BACKTRACE, every HACSERVE_*
#     variable and the variables named in $HACSERVE_TESTBED_ENV (space separated) are passed on;
#     nothing else (use `env VAR=value CMD` for more);
#   - stdin is the serial console (the host's stdin): `run-in-vm.sh bash` gives a shell.
#
# Settings (environment): HACSERVE_TESTBED_DIR (kernel + initramfs from setup.sh, default
# <repo>/target/testbed), HACSERVE_TESTBED_TIMEOUT (seconds, default 600),
# HACSERVE_TESTBED_CPUS (2), HACSERVE_TESTBED_MEM (MiB, 2048), HACSERVE_TESTBED_KEEP=1 (keep the
# run dir and print its path), HACSERVE_TESTBED_QEMU_ARGS (extra qemu arguments, word-split).
#
# The two-VM testbed (tests/testbed/run-in-2vm.sh sets these for each guest):
# HACSERVE_TESTBED_NETDEV (a qemu -netdev backend, e.g. socket,udp=H:P,localaddr=H:Q; the guest
# then gets a virtio-net NIC, eth0, instead of -nic none), HACSERVE_TESTBED_MAC (its MAC),
# HACSERVE_TESTBED_ADDR (its address on eth0, e.g. 192.0.2.2/24: rxe0 then sits on eth0, not
# dummy0), HACSERVE_TESTBED_SYNC (a host dir shared read-write, at the same path in the guest).
set -uo pipefail

t0=$(date +%s.%N)
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dir=${HACSERVE_TESTBED_DIR:-$repo/target/testbed}
timeout_s=${HACSERVE_TESTBED_TIMEOUT:-600}
cpus=${HACSERVE_TESTBED_CPUS:-2}
mem=${HACSERVE_TESTBED_MEM:-2048}

err() { echo "run-in-vm: ERROR: $*" >&2; }
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

if [ $# -eq 0 ]; then
  echo "usage: $0 CMD [ARGS...]" >&2
  exit 2
fi
qemu=$(command -v qemu-system-x86_64) || {
  err "qemu-system-x86_64 not found (run tests/testbed/setup.sh)"
  exit 125
}
for f in vmlinuz initramfs.cpio.gz; do
  [ -f "$dir/$f" ] || {
    err "$dir/$f missing (run tests/testbed/setup.sh)"
    exit 125
  }
done

# Single-quote a word for sh: ' becomes '\''.
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

run=$(mktemp -d "${TMPDIR:-/tmp}/hacserve-testbed.XXXXXX")
chmod 755 "$run"
mkdir -p "$run/out"
chmod 777 "$run/out"
cleanup() {
  if [ "${HACSERVE_TESTBED_KEEP:-0}" = 1 ]; then
    echo "run-in-vm: run dir kept: $run" >&2
  else
    rm -rf "$run"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

printf '%s\n' "$run" >"$run/hostdir"

# Networking: none (rxe0 on dummy0), or one virtio-net NIC on HACSERVE_TESTBED_NETDEV.
net=(-nic none)
if [ -n "${HACSERVE_TESTBED_NETDEV:-}" ]; then
  [ -n "${HACSERVE_TESTBED_ADDR:-}" ] || {
    err "HACSERVE_TESTBED_NETDEV needs HACSERVE_TESTBED_ADDR (the guest's address on eth0)"
    exit 125
  }
  net=(-netdev "$HACSERVE_TESTBED_NETDEV,id=n0"
    -device "virtio-net-pci,netdev=n0,mac=${HACSERVE_TESTBED_MAC:-52:54:00:12:34:56}")
  printf '%s\n' "$HACSERVE_TESTBED_ADDR" >"$run/net"
fi
sync_share=()
if [ -n "${HACSERVE_TESTBED_SYNC:-}" ]; then
  [ -d "$HACSERVE_TESTBED_SYNC" ] || {
    err "HACSERVE_TESTBED_SYNC=$HACSERVE_TESTBED_SYNC is not a directory"
    exit 125
  }
  sync_share=(-virtfs "local,path=$HACSERVE_TESTBED_SYNC,mount_tag=sync,security_model=none")
  printf '%s\n' "$HACSERVE_TESTBED_SYNC" >"$run/syncdir"
fi
{
  echo "# written by tests/testbed/run-in-vm.sh, run by the guest's /init in the chroot"
  vars=(PATH HOME USER LANG LC_ALL TERM RUST_LOG RUST_BACKTRACE)
  # shellcheck disable=SC2206
  vars+=(${HACSERVE_TESTBED_ENV:-})
  for v in $(compgen -e | grep '^HACSERVE_' || true); do vars+=("$v"); done
  for v in "${vars[@]}"; do
    case "$v" in HACSERVE_TESTBED_OUT | HACSERVE_TESTBED_ENV) continue ;; esac
    [ -n "${!v+set}" ] && echo "export $v=$(q "${!v}")"
  done
  echo "export HACSERVE_TESTBED_OUT=$(q "$run/out")"
  echo "export HACSERVE_TESTBED=1"
  echo "cd $(q "$PWD") || { echo $(q "run-in-vm: cannot cd to $PWD in the guest") >&2; exit 125; }"
  printf 'exec'
  for a in "$@"; do printf ' %s' "$(q "$a")"; done
  echo
} >"$run/cmd.sh"

# qboot: a minimal firmware that boots -kernel directly (faster than SeaBIOS, and it prints no
# terminal escape sequences on the console).
bios=()
[ -f /usr/share/qemu/qboot.rom ] && bios=(-bios /usr/share/qemu/qboot.rom)

echo "run-in-vm: booting ($cpus vCPUs, $mem MiB, TCG, ${HACSERVE_TESTBED_ADDR:-no NIC}, timeout ${timeout_s}s): $*" >&2
timeout -k 10 "$timeout_s" "$qemu" \
  -accel tcg,thread=multi -cpu max -smp "$cpus" -m "$mem" \
  -nographic -no-reboot "${net[@]}" -vga none "${bios[@]}" \
  -kernel "$dir/vmlinuz" -initrd "$dir/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet panic=-1 ${HACSERVE_TESTBED_KERNEL_ARGS-clocksource=tsc tsc=reliable}" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs "local,path=$run,mount_tag=results,security_model=none" "${sync_share[@]}" \
  ${HACSERVE_TESTBED_QEMU_ARGS:-}
qrc=$?

if [ -n "${HACSERVE_TESTBED_OUT:-}" ]; then
  mkdir -p "$HACSERVE_TESTBED_OUT" && cp -a "$run/out/." "$HACSERVE_TESTBED_OUT/"
fi

if [ -f "$run/exit" ]; then
  rc=$(cat "$run/exit")
  echo "run-in-vm: command exited $rc; boot + run took $(elapsed) s" >&2
  exit "$rc"
fi
if [ $qrc -eq 124 ] || [ $qrc -eq 137 ]; then
  if [ -f "$run/started" ]; then
    err "timed out after ${timeout_s}s while the command was running"
  else
    err "timed out after ${timeout_s}s before the VM reached the command"
  fi
  exit 124
fi
if [ -f "$run/setup-failed" ]; then
  err "the VM never reached the command: guest setup failed: $(cat "$run/setup-failed")"
elif [ -f "$run/started" ]; then
  err "the VM stopped (qemu status $qrc) before the command ended; no exit status"
else
  err "the VM never reached the command (qemu status $qrc); see the console output above"
fi
exit 125

#!/usr/bin/env bash
# Runs two commands in two qemu VMs joined by a virtual Ethernet link: CMD_A in guest "a"
# (192.0.2.1, the server side), CMD_B in guest "b" (192.0.2.2, the client side). Each guest
# has its own Soft-RoCE device, rxe0 on its eth0 (virtio-net), so RoCE packets cross the link.
#
#   tests/testbed/run-in-2vm.sh 'CMD_A' 'CMD_B'       # each a sh command line (sh -c)
#   tests/testbed/run-in-2vm.sh 'sh server.sh' 'sh client.sh'
#
# The link: qemu's socket netdev over UDP on the host's loopback (each guest's frames are
# datagrams to the other's port), so no root, no tap, no bridge, and no start order.
# Each guest is run-in-vm.sh's VM (same chroot, same conventions) with 1 vCPU (the host has 2
# cores) and HACSERVE_TESTBED_MEM MiB (default here 1536).
#
# In each guest: HACSERVE_TESTBED_VM (a or b), HACSERVE_TESTBED_ADDR (its own address, with
# /24), HACSERVE_TESTBED_PEER (the other's address), HACSERVE_TESTBED_SYNC (a dir both guests
# share read-write: touch a file there to tell the other side, e.g. "server up" or "client
# done"; both see it at once, 9p has no cache here), HACSERVE_TESTBED_OUT (as in run-in-vm.sh).
#
# Output: both consoles, live, each line prefixed "a| " or "b| " (run-in-vm.sh's stderr lines
# included). Then on stderr: "run-in-2vm: status a=N b=M; boot + run took T s".
# Exit status: 124/125 if either VM failed as a testbed (timeout / never ran the command /
# died), else CMD_A's status if it is not 0, else CMD_B's.
# Files: with HACSERVE_TESTBED_OUT=/dir on the host, guest a's files land in /dir/a, b's in
# /dir/b.
# Settings as run-in-vm.sh's (HACSERVE_TESTBED_TIMEOUT applies to each VM), plus
# HACSERVE_TESTBED_2VM_CPUS (vCPUs per guest, 1).
set -uo pipefail

t0=$(date +%s.%N)
here=$(cd "$(dirname "$0")" && pwd)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
err() { echo "run-in-2vm: ERROR: $*" >&2; }

if [ $# -ne 2 ]; then
  echo "usage: $0 'CMD_A' 'CMD_B'   (a: 192.0.2.1, b: 192.0.2.2)" >&2
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/hacserve-2vm.XXXXXX")
chmod 755 "$work"
mkdir -p "$work/sync"
chmod 777 "$work/sync"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Two free UDP ports on the loopback (qemu binds localaddr; taken ports make it fail, 125).
used=$(ss -Hunl 2>/dev/null | awk '{ print $4 }' | sed 's/.*://' | sort -u)
pick() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    grep -qx "$p" <<<"$used" || { echo "$p"; return; }
  done
}
port_a=$(pick)
port_b=$(pick)
while [ "$port_b" = "$port_a" ]; do port_b=$(pick); done

out_host=${HACSERVE_TESTBED_OUT:-}
# vm NAME ADDR PEER MAC LOCAL REMOTE CMD: one guest, console prefixed, status to $work/NAME.rc.
vm() {
  local name=$1 addr=$2 peer=$3 mac=$4 local_port=$5 remote_port=$6 cmd=$7
  local out=()
  [ -n "$out_host" ] && out=(HACSERVE_TESTBED_OUT="$out_host/$name")
  [ -n "$out_host" ] || out=(-u HACSERVE_TESTBED_OUT)
  (
    env "${out[@]}" \
      HACSERVE_TESTBED_CPUS="${HACSERVE_TESTBED_2VM_CPUS:-1}" \
      HACSERVE_TESTBED_MEM="${HACSERVE_TESTBED_MEM:-1536}" \
      HACSERVE_TESTBED_NETDEV="socket,udp=127.0.0.1:$remote_port,localaddr=127.0.0.1:$local_port" \
      HACSERVE_TESTBED_MAC="$mac" \
      HACSERVE_TESTBED_ADDR="$addr/24" \
      HACSERVE_TESTBED_PEER="$peer" \
      HACSERVE_TESTBED_VM="$name" \
      HACSERVE_TESTBED_SYNC="$work/sync" \
      "$here/run-in-vm.sh" sh -c "$cmd" </dev/null 2>&1 | sed -u "s/^/$name| /"
    echo "${PIPESTATUS[0]}" >"$work/$name.rc"
  ) &
  pids+=($!)
}

echo "run-in-2vm: a 192.0.2.1 (udp :$port_a) <-> b 192.0.2.2 (udp :$port_b)" >&2
vm a 192.0.2.1 192.0.2.2 52:54:00:00:02:01 "$port_a" "$port_b" "$1"
vm b 192.0.2.2 192.0.2.1 52:54:00:00:02:02 "$port_b" "$port_a" "$2"
wait "${pids[@]}"
pids=()

rc_a=$(cat "$work/a.rc" 2>/dev/null || echo 125)
rc_b=$(cat "$work/b.rc" 2>/dev/null || echo 125)
echo "run-in-2vm: status a=$rc_a b=$rc_b; boot + run took $(elapsed) s" >&2
for rc in "$rc_a" "$rc_b"; do
  if [ "$rc" = 125 ] || [ "$rc" = 124 ]; then
    err "a VM failed as a testbed (status $rc); see its console above"
    exit "$rc"
  fi
done
[ "$rc_a" = 0 ] || exit "$rc_a"
exit "$rc_b"

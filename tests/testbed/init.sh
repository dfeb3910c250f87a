#!/bin/sh
# /init of the testbed's initramfs (busybox sh; copied in by tests/testbed/setup.sh).
#
# Loads the modules, mounts the host root (9p, read-only) at /newroot and the run dir of
# run-in-vm.sh (9p tag "results", read-write) at /results, sets up dummy0 + rxe0 (or, in the
# two-VM testbed, eth0 + rxe0 and the shared sync dir), then runs
# /results/cmd.sh chrooted into the host root and writes its exit status to /results/exit.
# Protocol with tests/testbed/run-in-vm.sh (its run dir, seen here as /results):
#   hostdir   in:  the run dir's path on the host (bind-mounted at the same path in the chroot)
#   net       in:  (two VMs only) this guest's address on eth0, e.g. 192.0.2.2/24
#   syncdir   in:  (two VMs only) host path of the dir shared by both guests (9p tag "sync")
#   cmd.sh    in:  the script to run in the chroot (env, cd, exec CMD)
#   started   out: written right before cmd.sh starts
#   exit      out: CMD's exit status, written after it ends (authoritative)
# Console markers (for humans and as a fallback): HACSERVE_TESTBED_BEGIN before the command,
# HACSERVE_TESTBED_EXIT=<n> after it, HACSERVE_TESTBED_SETUP_FAILED: <why> if it never ran.
export PATH=/bin:/sbin

mount -t devtmpfs dev /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys

say() { echo "testbed-init: $*"; }
off() {
  sync
  [ -n "${syncdir:-}" ] && umount /newroot/"$syncdir" 2>/dev/null
  umount /newroot/"$hostdir" 2>/dev/null
  umount /results 2>/dev/null
  poweroff -f
  sleep 10
}
fail() {
  echo "HACSERVE_TESTBED_SETUP_FAILED: $*"
  [ -d /results ] && echo "$*" >/results/setup-failed 2>/dev/null
  off
}

# Kernel messages (rxe, 9p) would interleave with the command's output: keep them to errors.
echo 3 >/proc/sys/kernel/printk

for m in $(cat /etc/modules.order); do
  insmod /lib/modules/"$m".ko || fail "insmod $m"
done

p9=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$p9,rw" results /results || fail "mount of the results share (9p tag results)"
mount -t 9p -o "$p9,ro" hostroot /newroot || fail "mount of the host root (9p tag hostroot)"

R=/newroot
mount -t proc proc $R/proc || fail "mount proc"
mount -t sysfs sys $R/sys || fail "mount sysfs"
mount -t devtmpfs dev $R/dev || fail "mount devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t configfs configfs $R/sys/kernel/config 2>/dev/null
# /tmp: the host's /tmp (read-only lower layer) under a writable tmpfs layer, so that files the
# host put in /tmp are seen and the guest can write; plain tmpfs if overlayfs is refused.
mkdir -p /scratch
mount -t tmpfs -o mode=755 tmpfs /scratch || fail "tmpfs on /scratch"
mkdir -p /scratch/tmp-upper /scratch/tmp-work
chmod 1777 /scratch/tmp-upper
if ! mount -t overlay overlay \
  -o lowerdir=$R/tmp,upperdir=/scratch/tmp-upper,workdir=/scratch/tmp-work $R/tmp; then
  say "overlay on /tmp refused: /tmp is an empty tmpfs"
  mount -t tmpfs -o mode=1777 tmpfs $R/tmp || fail "tmpfs on /tmp"
fi
for d in /var/tmp /run; do
  mount -t tmpfs -o mode=1777 tmpfs $R$d || fail "tmpfs on $d"
done

# The run dir, at the same path as on the host (it may live under /tmp, now a tmpfs).
hostdir=$(cat /results/hostdir) || fail "no /results/hostdir"
mkdir -p "$R$hostdir" 2>/dev/null
mount -o bind /results "$R$hostdir" || fail "bind mount of the run dir at $hostdir"

# The two-VM testbed (run-in-2vm.sh): a dir both guests share read-write (9p tag "sync"), at
# the host path named in /results/syncdir, for the two sides to wait for each other.
if [ -f /results/syncdir ]; then
  syncdir=$(cat /results/syncdir)
  mkdir -p "$R$syncdir" 2>/dev/null
  mount -t 9p -o "$p9,rw" sync "$R$syncdir" || fail "mount of the sync share at $syncdir"
fi

# Network. One VM: dummy0 (created by the dummy module) with 192.0.2.1/24, rxe0 on top of it.
# Two VMs (run-in-2vm.sh): /results/net holds this guest's address (e.g. 192.0.2.2/24); it goes
# on eth0, the virtio-net link to the other guest, and rxe0 on eth0.
# busybox ip (no 9p round trips) for the links; iproute2's rdma from the host root for rxe0.
ip link set lo up || fail "ip link set lo up"
if [ -f /results/net ]; then
  addr=$(cat /results/net)
  i=0
  while [ ! -d /sys/class/net/eth0 ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "no eth0 (virtio-net): $(ls /sys/class/net)"
    sleep 0.1
  done
  netdev=eth0
  ip addr add "$addr" dev eth0 || fail "ip addr add $addr on eth0"
  ip link set eth0 up || fail "ip link set eth0 up"
else
  netdev=dummy0
  [ -d /sys/class/net/dummy0 ] || ip link add dummy0 type dummy || fail "no dummy0"
  ip addr add 192.0.2.1/24 dev dummy0 || fail "ip addr add on dummy0"
  ip link set dummy0 up || fail "ip link set dummy0 up"
fi
chroot $R /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin rdma link add rxe0 type rxe netdev $netdev ||
  fail "rdma link add rxe0 on $netdev"

# No udev: the nodes come from devtmpfs. Wait for them (they appear asynchronously).
i=0
while [ ! -c $R/dev/infiniband/uverbs0 ] || [ ! -c $R/dev/infiniband/rdma_cm ]; do
  i=$((i + 1))
  [ $i -gt 100 ] && fail "/dev/infiniband/uverbs0 or rdma_cm missing: $(ls $R/dev/infiniband 2>&1)"
  sleep 0.1
done
chmod 666 $R/dev/infiniband/* 2>/dev/null

# Clean console output for the command: no \r added to its newlines.
stty -onlcr 2>/dev/null

echo started >/results/started
sync
echo "HACSERVE_TESTBED_BEGIN"
env -i chroot $R /bin/sh "$hostdir/cmd.sh"
rc=$?
echo "$rc" >/results/exit.tmp && mv /results/exit.tmp /results/exit
sync
echo "HACSERVE_TESTBED_EXIT=$rc"
off

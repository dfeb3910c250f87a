#!/usr/bin/env bash
# bench_rdma across the two-VM Soft-RoCE link (tests/testbed/run-in-2vm.sh): guest a
# (192.0.2.1) runs `bench_rdma --serve` (perftest servers, one rdma_server per
# configuration, the proxy), guest b (192.0.2.2) runs `bench_rdma --peer` against it, so
# ib_write_lat / ib_write_bw and our rows all cross the virtual link in the same run.
#
# Usage: scripts/bench_rdma_2vm.sh OUT_DIR [bench_rdma options, the same for both sides...]
# Output: OUT_DIR/2vm.log (both consoles), OUT_DIR/2vm.txt (b's table), OUT_DIR/b/2vm.csv.
# Each guest has one vCPU (the host has two), so prefer --modes fast,event (busy modes
# spin the guest's only CPU against Soft-RoCE's kernel work) and few iterations: a round
# trip across the emulated link costs milliseconds.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/bench_rdma_2vm.sh OUT_DIR [bench_rdma options...]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
opts=$(printf ' %q' "$@")
serve="target/release/bench_rdma --serve --host 192.0.2.1$opts > /tmp/serve.log 2>&1 & p=\$!
for _ in \$(seq 1 300); do grep -q 'bench_rdma serving' /tmp/serve.log && break; sleep 0.2; done
cat /tmp/serve.log; touch \"\$HACSERVE_TESTBED_SYNC/up\"
while [ ! -e \"\$HACSERVE_TESTBED_SYNC/done\" ]; do sleep 0.5; done
kill -TERM \$p; wait \$p; tail -20 /tmp/serve.log"
peer="for _ in \$(seq 1 600); do [ -e \"\$HACSERVE_TESTBED_SYNC/up\" ] && break; sleep 0.2; done
target/release/bench_rdma --peer --host 192.0.2.1 --csv \"\$HACSERVE_TESTBED_OUT/2vm.csv\" --label 2vm$opts; rc=\$?
touch \"\$HACSERVE_TESTBED_SYNC/done\"; exit \$rc"
HACSERVE_TESTBED_TIMEOUT=${HACSERVE_TESTBED_TIMEOUT:-1200} HACSERVE_TESTBED_OUT="$out" \
  tests/testbed/run-in-2vm.sh "$serve" "$peer" </dev/null > "$out/2vm.log" 2>&1 &
wait $! || { echo "bench_rdma_2vm: failed (see $out/2vm.log)" >&2; exit 1; }
sed -n '/^b| HACSERVE_TESTBED_BEGIN/,/^b| HACSERVE_TESTBED_EXIT/p' "$out/2vm.log" \
  | sed 's/^b| //' | grep -v ' INFO \| WARN \|^\[\|HACSERVE_TESTBED' | tee "$out/2vm.txt"

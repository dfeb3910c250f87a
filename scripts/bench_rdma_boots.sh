#!/usr/bin/env bash
# bench_rdma in N fresh boots of the Soft-RoCE VM (tests/testbed), then one table over the
# boots: each row's p50 RTT/2 (latency) or MB/sec (bandwidth) and its ratio to perftest's row,
# per boot. Emulated CPUs vary from boot to boot, so compare only within a boot; the table
# shows how far each ratio moves between boots.
#
# Usage: scripts/bench_rdma_boots.sh OUT_DIR [BOOTS (3)] [bench_rdma options...]
# Needs target/release/{bench_rdma,rdma_server,rdma_proxy} and models/resnet_tiny.onnx
# (target/release/gen_models --only tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/bench_rdma_boots.sh OUT_DIR [BOOTS] [bench_rdma options...]}
boots=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
out=$(cd "$out" && pwd)
for b in $(seq 1 "$boots"); do
  echo "bench_rdma_boots: boot $b of $boots" >&2
  # Rows also as CSV (boot$b.csv), written in the guest and copied out by run-in-vm.sh.
  HACSERVE_TESTBED_TIMEOUT=${HACSERVE_TESTBED_TIMEOUT:-1800} HACSERVE_TESTBED_OUT="$out" tests/testbed/run-in-vm.sh sh -c \
    'exec target/release/bench_rdma --csv "$HACSERVE_TESTBED_OUT/boot$0.csv" --label "boot$0" "$@"' \
    "$b" "$@" </dev/null > "$out/boot$b.log" 2>&1 &
  wait $! || { echo "bench_rdma_boots: boot $b failed (see $out/boot$b.log)" >&2; exit 1; }
  # The table alone, from the console.
  sed -n '/HACSERVE_TESTBED_BEGIN/,/HACSERVE_TESTBED_EXIT/p' "$out/boot$b.log" \
    | grep -v ' INFO \| WARN \|^\[\|HACSERVE_TESTBED' > "$out/boot$b.txt" || true
done
python3 - "$out" "$boots" <<'PY'
import re, sys
out, boots = sys.argv[1], int(sys.argv[2])
rows, order = {}, []
for b in range(1, boots + 1):
    section = None
    for line in open(f"{out}/boot{b}.txt"):
        if "#bytes" in line:
            section = "bw" if "MB/sec" in line else "lat"
            continue
        m = re.match(r"^ (\S.*?)\s{2,}(\d+)\s+(\d+)\s+(.*)$", line.rstrip())
        if not m or section is None:
            continue
        name, size, cells = m.group(1), int(m.group(2)), m.group(4).split()
        if section == "lat":
            fig, q = cells[2], cells[-2]      # t_typical, ratio typical
        else:
            fig, q = cells[1], cells[-1]      # BW average, ratio
        key = (section, size, name)
        if key not in rows:
            rows[key] = {}
            order.append(key)
        rows[key][b] = (fig, q)
head = f" {'row':<34}{'#bytes':>9}" + "".join(f"{'boot'+str(b)+' fig':>14}{'ratio':>7}" for b in range(1, boots + 1))
print("-" * len(head))
print(" over boots: latency rows p50 RTT/2 [usec], bandwidth rows BW average [MB/sec]; ratio to perftest's row of the same boot")
print(head)
for key in order:
    section, size, name = key
    cells = "".join(f"{rows[key].get(b, ('-', '-'))[0]:>14}{rows[key].get(b, ('-', '-'))[1]:>7}" for b in range(1, boots + 1))
    print(f" {name:<34}{size:>9}{cells}")
print("-" * len(head))
PY

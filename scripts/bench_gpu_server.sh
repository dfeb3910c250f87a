#!/usr/bin/env bash
# zmq_server with the GPU backend over loopback: one GPU vs every GPU listed, same clients.
# Usage: scripts/bench_gpu_server.sh OUT_DIR [GPU_LISTS...]   (default lists: "0" "0,1")
# Needs release binaries (zmq_server, zmq_client, multi_client, gen_models) in target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?output folder}; shift
lists=("$@"); [ ${#lists[@]} -gt 0 ] || lists=("0" "0,1")
bin=${BIN:-target/release}
CLIENTS=${CLIENTS:-32} REQUESTS=${REQUESTS:-200} WORKERS=${WORKERS:-16} TASK=${TASK:-1} MODE=${MODE:-range}
[ -f models/resnet50.onnx ] || $bin/gen_models --out-dir models --only resnet50
mkdir -p "$out"
port=5600
for gpus in "${lists[@]}"; do
  port=$((port + 1))
  tag=gpus_${gpus//,/_}_t${TASK}
  $bin/zmq_server --backend gpu --gpus "$gpus" --workers "$WORKERS" --engine-file models/resnet50.onnx \
    --bind-address 127.0.0.1 --port $port --poll-mode block -i 0 > "$out/$tag.server.log" 2>&1 &
  server=$!
  for _ in $(seq 1 120); do grep -q "listening on" "$out/$tag.server.log" && break; sleep 0.5; done
  echo "=== --gpus $gpus, $WORKERS workers, task $TASK, $CLIENTS clients x $REQUESTS requests ($MODE)"
  $bin/multi_client --host 127.0.0.1 -p $port -c "$CLIENTS" -t "$TASK" -r "$REQUESTS" --warmup 10 \
    -m "$MODE" -f "$out/$tag" 2>&1 | tail -12 | tee "$out/$tag.summary.txt" || true
  kill -INT $server; wait $server || true
  grep -E "requests per GPU|stopped" "$out/$tag.server.log" | tee -a "$out/$tag.summary.txt"
done

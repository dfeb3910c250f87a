#!/usr/bin/env bash
# THE GPU benchmark, one command: PyTorch and our engine on the same ResNet-50 weights in the same
# run, then the server end to end.
#   1. scripts/torch_peer.py make-jpeg: the 500x375 JPEG of the decode comparison
#   2. scripts/torch_peer.py export:    torchvision ResNet-50 (seed 0) as ONNX + input + fp32 logits
#   3. scripts/torch_peer.py bench:     PyTorch fp16 CUDA-graph batch 1 / batch 32, decode_jpeg
#   4. bench_gpu:                       our figures vs 3., goals, FP32/FP16 agreement with PyTorch
#   5. zmq_server --backend gpu (fp16, CUDA graph, nvJPEG decode) over loopback, multi_client at
#      1, 8 and 32 clients, task 4 (jpeg: infer of the JPEG from 1.), dynamic batching off and on
#   6. bench_gpudirect:                 rdma_server's -a 0 (host ring + upload) vs -a 1 (GPU-resident)
#      server time per request, through the loopback ring source (no NIC needed), when built
# Everything lands in OUT_DIR; the combined table is printed at the end (and OUT_DIR/summary.txt).
#
# Usage: scripts/bench_gpu.sh OUT_DIR
# Needs release binaries bench_gpu, zmq_server, zmq_client, multi_client in $BIN (default
# target/release) and python3 ($PYTHON) with torch, torchvision, onnx, numpy, opencv.
# Knobs (env): LEVELS ("1 8 32"), MAX_BATCHES (server --max-batch values, "1 8"), REQUESTS (per client, 1000), WORKERS (server, 16), PORT (5700),
# ITERS (batch-1 runs, 1000), BATCH_ITERS (200), DECODE_ITERS (500).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/bench_gpu.sh OUT_DIR}
bin=${BIN:-target/release}
py=${PYTHON:-python3}
LEVELS=${LEVELS:-"1 8 32"} MAX_BATCHES=${MAX_BATCHES:-"1 8"} REQUESTS=${REQUESTS:-1000} WORKERS=${WORKERS:-16} PORT=${PORT:-5700}
ITERS=${ITERS:-1000} BATCH_ITERS=${BATCH_ITERS:-200} DECODE_ITERS=${DECODE_ITERS:-500}
for b in bench_gpu zmq_server zmq_client multi_client; do
  [ -x "$bin/$b" ] || { echo "bench_gpu.sh: $bin/$b missing (cargo build --release, or set BIN)" >&2; exit 1; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
started=$(date +%s)
notes=()

echo "=== 1. JPEG for the decode comparison"
jpeg=$out/hopper_500x375.jpg
if ! "$py" scripts/torch_peer.py make-jpeg --src models/grace_hopper.jpg --out "$jpeg"; then
  jpeg=models/grace_hopper.jpg
  notes+=("make-jpeg failed: decode figures use $jpeg (512x600), not the 500x375 reference size")
fi

echo "=== 2. PyTorch export (model, input, fp32 logits)"
"$py" scripts/torch_peer.py export --out "$out/torch" 2>&1 | tee "$out/export.log"

echo "=== 3. PyTorch timings"
if ! "$py" scripts/torch_peer.py bench --model-dir "$out/torch" --jpeg "$jpeg" --json "$out/torch_bench.json" \
    --iters "$ITERS" --batch-iters "$BATCH_ITERS" --decode-iters "$DECODE_ITERS" 2>&1 | tee "$out/torch_bench.log"; then
  rm -f "$out/torch_bench.json"
  notes+=("torch_peer.py bench failed (see $out/torch_bench.log): no PyTorch columns")
fi

echo "=== 4. bench_gpu (engine vs PyTorch)"
bench_status=0
"$bin/bench_gpu" --model-dir "$out/torch" --jpeg "$jpeg" --torch-json "$out/torch_bench.json" \
  --json "$out/bench_gpu.json" --iters "$ITERS" --batch-iters "$BATCH_ITERS" --decode-iters "$DECODE_ITERS" \
  2>&1 | tee "$out/bench_gpu.txt" || bench_status=$?
[ "$bench_status" -eq 0 ] || notes+=("bench_gpu exited with status $bench_status (see $out/bench_gpu.txt)")

echo "=== 5. end to end: zmq_server --backend gpu over loopback"
e2e=$out/e2e
mkdir -p "$e2e"
server=
stop_server() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill -INT "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  server=
}
trap stop_server EXIT
rows=()
# Dynamic batching off (--max-batch 1) and on, same clients, same run.
for mb in $MAX_BATCHES; do
  log=$e2e/server_mb$mb.log
  "$bin/zmq_server" --backend gpu --precision fp16 --decode gpu --gpus 0 --workers "$WORKERS" \
    --max-batch "$mb" --engine-file "$out/torch/resnet50.onnx" --bind-address 127.0.0.1 --port "$PORT" \
    --poll-mode block -i 0 > "$log" 2>&1 &
  server=$!
  up=0
  for _ in $(seq 1 240); do
    if grep -q "listening on" "$log"; then up=1; break; fi
    kill -0 "$server" 2>/dev/null || break
    sleep 0.5
  done
  if [ "$up" -eq 1 ]; then
    for c in $LEVELS; do
      echo "--- max batch $mb, $c client(s) x $REQUESTS requests, task 4 (jpeg infer)"
      tag=mb${mb}_clients_$c
      "$bin/multi_client" --host 127.0.0.1 -p "$PORT" -c "$c" -t jpeg -r "$REQUESTS" --warmup 20 -m single \
        -i "$jpeg" -f "$e2e/$tag" > "$e2e/$tag.txt" 2>&1 || notes+=("multi_client -c $c (max batch $mb) failed (see $e2e/$tag.txt)")
      tail -4 "$e2e/$tag.txt"
      csv=$e2e/$tag/multi_client_summary.csv
      if [ -f "$csv" ]; then
        rows+=("$(awk -F, -v mb="$mb" 'NR == 2 { printf " %9s  %7s  %8s  %6s  %10.1f  %9.3f  %9.3f  %9.3f", mb, $1, $2, $3, $5, $6 / 1e6, $7 / 1e6, $8 / 1e6 }' "$csv")")
      else
        rows+=("$(printf ' %9s  %7s  (no result)' "$mb" "$c")")
      fi
    done
  else
    notes+=("zmq_server --max-batch $mb did not come up (see $log)")
    tail -5 "$log" || true
  fi
  stop_server
  grep -E "requests per GPU|stopped" "$log" || true
  PORT=$((PORT + 1))
done
trap - EXIT

echo "=== 6. GPUDirect: -a 0 vs -a 1 server time per request (loopback ring source)"
if [ -x "$bin/bench_gpudirect" ]; then
  "$bin/bench_gpudirect" --engine-file "$out/torch/resnet50.onnx" --iters "$ITERS" 2>&1 | tee "$out/bench_gpudirect.txt" \
    || notes+=("bench_gpudirect failed (see $out/bench_gpudirect.txt)")
else
  notes+=("$bin/bench_gpudirect missing: no -a 0 vs -a 1 figures")
fi

{
  echo
  echo "================ GPU benchmark summary ($(date -u +%FT%TZ), $(( $(date +%s) - started )) s) ================"
  if [ -f "$out/bench_gpu.txt" ]; then
    # The table and what follows it, without the progress lines of other steps.
    sed -n '/^bench_gpu:/,$p' "$out/bench_gpu.txt"
  fi
  echo
  echo "end to end: zmq_server --backend gpu --precision fp16 --decode gpu, $WORKERS workers, loopback,"
  echo "task 4 (jpeg infer of $(basename "$jpeg")), $REQUESTS requests per client after 20 warm-up"
  echo " max batch  clients  requests  errors       req/s    p50[ms]    p90[ms]    p99[ms]"
  for r in ${rows[@]+"${rows[@]}"}; do echo "$r"; done
  if [ -f "$out/bench_gpudirect.txt" ]; then
    echo
    sed -n '/^bench_gpudirect:/,$p' "$out/bench_gpudirect.txt"
  fi
  for n in ${notes[@]+"${notes[@]}"}; do echo "!!!!!!!! $n"; done
  echo "files: $out"
} | tee "$out/summary.txt"

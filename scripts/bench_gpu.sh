#!/usr/bin/env bash
# THE GPU benchmark, one command: PyTorch and our engine on the same ResNet-50 weights in the same
# run, then the server end to end.
#   1. scripts/torch_peer.py make-jpeg: the 500x375 JPEG of the decode comparison
#   2. scripts/torch_peer.py export:    torchvision ResNet-50 (seed 0) as ONNX + input + fp32 logits
#   3. scripts/torch_peer.py bench:     PyTorch fp16 CUDA-graph batch 1 / 32 / 128, decode_jpeg, and
#                                       torch.compile reduce-overhead / max-autotune at batch 1 and
#                                       128 (each mode in its own process, capped: COMPILE_TIMEOUT)
#   4. bench_gpu:                       our figures vs 3., goals, FP32/FP16 agreement with PyTorch,
#                                       the batch-1 per-layer profile
#   5. bench_decode + torch_peer.py decode-batch: nvJPEG hardware (batched) vs hybrid vs CPU decode,
#      latency and images/s, for the 500x375 JPEG, a 1080p and a 12 MP one (made in 1.), next to
#      torchvision's batched GPU decode of the same files
#   6. zmq_server --backend gpu over loopback, multi_client's in-process load generator
#      (--concurrency-range, closed loop): per server configuration (E2E_CONFIGS), task jpeg at 1
#      and 64 outstanding; for the first configuration also task processed (602,144 B tensors)
#      and the echo task at the same size (the transport's ceiling) and at the JPEG's size
#   7. bench_gpudirect:                 rdma_server's -a 0 (host ring + upload) vs -a 1 (GPU-resident)
#      server time per request, through the loopback ring source (no NIC needed), when built
# Everything lands in OUT_DIR; the combined table with the goals is printed at the end (and
# OUT_DIR/summary.txt, written by scripts/bench_gpu_summary.py).
#
# Usage: scripts/bench_gpu.sh OUT_DIR
# Needs release binaries bench_gpu, bench_decode, zmq_server, multi_client in $BIN (default
# target/release) and python3 ($PYTHON) with torch, torchvision, onnx, numpy, opencv.
# Knobs (env): STEPS ("torch engine decode e2e gpudirect": which of 3-7 run), E2E_CONFIGS
# (space-separated decode,workers,max-batch,max-queue-delay-us[,overlap]; overlap = on|off,
# zmq_server's --overlap-batches, default off; default "gpu,4,16,0,off gpu,4,16,0,on
# gpu,8,16,0,off hybrid,16,8,0,off": the best measured configuration, the same overlapped, twice
# the workers, and the previous path),
# WINDOW_MS (multi_client window, 2000), TRIALS (windows per level at most, 5), PORT
# (5700), ITERS (batch-1 runs, 1000), BATCH_ITERS (200), DECODE_ITERS (500), DECODE_SECONDS
# (per throughput figure, 1.5), COMPILE_MODES ("reduce-overhead,max-autotune"), COMPILE_TIMEOUT
# (seconds per torch.compile mode, compile and timing together: 240).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/bench_gpu.sh OUT_DIR}
bin=${BIN:-target/release}
py=${PYTHON:-python3}
STEPS=${STEPS:-"torch engine decode e2e gpudirect"}
E2E_CONFIGS=${E2E_CONFIGS:-"gpu,4,16,0,off gpu,4,16,0,on gpu,8,16,0,off hybrid,16,8,0,off"}
WINDOW_MS=${WINDOW_MS:-2000} TRIALS=${TRIALS:-5} PORT=${PORT:-5700}
ITERS=${ITERS:-1000} BATCH_ITERS=${BATCH_ITERS:-200} DECODE_ITERS=${DECODE_ITERS:-500}
DECODE_SECONDS=${DECODE_SECONDS:-1.5}
COMPILE_MODES=${COMPILE_MODES-reduce-overhead,max-autotune} COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-240}
step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
for b in bench_gpu bench_decode zmq_server multi_client; do
  [ -x "$bin/$b" ] || { echo "bench_gpu.sh: $bin/$b missing (cargo build --release, or set BIN)" >&2; exit 1; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
started=$(date +%s)
notes=()

echo "=== 1. JPEGs for the decode comparison: 500x375, 1920x1080, 4000x3000 (12 MP)"
jpeg=$out/hopper_500x375.jpg
if ! "$py" scripts/torch_peer.py make-jpeg --src models/grace_hopper.jpg --out "$jpeg"; then
  jpeg=models/grace_hopper.jpg
  notes+=("make-jpeg failed: decode figures use $jpeg (512x600), not the 500x375 reference size")
fi
jpegs=$jpeg
for size in 1920x1080 4000x3000; do
  if "$py" scripts/torch_peer.py make-jpeg --src models/grace_hopper.jpg --size "$size" --out "$out/hopper_$size.jpg"; then
    jpegs=$jpegs,$out/hopper_$size.jpg
  else
    notes+=("make-jpeg --size $size failed: no $size decode figures")
  fi
done

echo "=== 2. PyTorch export (model, input, fp32 logits)"
"$py" scripts/torch_peer.py export --out "$out/torch" 2>&1 | tee "$out/export.log"

echo "=== 3. PyTorch timings"
if ! step torch; then
  echo "(skipped: STEPS)"
elif ! "$py" scripts/torch_peer.py bench --model-dir "$out/torch" --jpeg "$jpeg" --json "$out/torch_bench.json" \
    --iters "$ITERS" --batch-iters "$BATCH_ITERS" --decode-iters "$DECODE_ITERS" \
    --compile-modes "$COMPILE_MODES" --compile-timeout "$COMPILE_TIMEOUT" 2>&1 | tee "$out/torch_bench.log"; then
  rm -f "$out/torch_bench.json"
  notes+=("torch_peer.py bench failed (see $out/torch_bench.log): no PyTorch columns")
fi

echo "=== 4. bench_gpu (engine vs PyTorch)"
bench_status=0
step engine && "$bin/bench_gpu" --model-dir "$out/torch" --jpeg "$jpeg" --torch-json "$out/torch_bench.json" \
  --json "$out/bench_gpu.json" --iters "$ITERS" --batch-iters "$BATCH_ITERS" --decode-iters "$DECODE_ITERS" \
  2>&1 | tee "$out/bench_gpu.txt" || bench_status=$?
[ "$bench_status" -eq 0 ] || notes+=("bench_gpu exited with status $bench_status (see $out/bench_gpu.txt)")

echo "=== 5. decode: nvJPEG hardware (batched) vs hybrid vs CPU; torchvision's batched decode"
if step decode; then
  "$bin/bench_decode" --engine-file "$out/torch/resnet50.onnx" --jpegs "$jpegs" --batches 1,8,32 \
    --threads 1,8 --seconds "$DECODE_SECONDS" --json "$out/decode.jsonl" 2>&1 | tee "$out/bench_decode.txt" \
    || notes+=("bench_decode failed (see $out/bench_decode.txt)")
  "$py" scripts/torch_peer.py decode-batch --jpegs "$jpegs" --batches 1,8,32 --seconds "$DECODE_SECONDS" \
    --json "$out/torch_decode.jsonl" 2>&1 | tee "$out/torch_decode.txt" \
    || notes+=("torch_peer.py decode-batch failed (see $out/torch_decode.txt)")
fi

echo "=== 6. end to end: zmq_server --backend gpu over loopback, multi_client in-process load"
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
# One level: TAG TASK OUTSTANDING [extra multi_client options]; the load generator's threads
# sit on the last cores, away from the server's receive loop (core 0) and workers (1..).
level() {
  local tag=$1 task=$2 c=$3; shift 3
  local conns=$(( c < 8 ? c : 8 )) threads=$(( c < 8 ? 1 : 2 ))
  local depth=$(( (c + conns - 1) / conns ))
  local cores; cores=$(nproc)
  echo "--- $tag: task $task, $c outstanding ($conns connections x depth $depth, $threads threads)"
  "$bin/multi_client" --host 127.0.0.1 -p "$PORT" -c "$conns" --depth "$depth" --threads "$threads" \
    --first-core $(( cores - threads )) -t "$task" --concurrency-range "$c:$c:1" --warmup 200 \
    --measurement-interval "$WINDOW_MS" --max-trials "$TRIALS" --server-pid "$server" --log-capacity 1000 \
    -s -f "$e2e/$tag" "$@" > "$e2e/$tag.txt" 2>&1 || notes+=("multi_client $tag failed (see $e2e/$tag.txt)")
  tail -3 "$e2e/$tag.txt"
}
if step e2e; then
  first=1
  for cfg in $E2E_CONFIGS; do
    IFS=, read -r decode workers mb delay overlap <<< "$cfg"
    overlap=${overlap:-off}
    name=${decode}_w${workers}_mb${mb}_d${delay}_${overlap}
    log=$e2e/server_$name.log
    "$bin/zmq_server" --backend gpu --precision fp16 --decode "$decode" --gpus 0 --workers "$workers" \
      --max-batch "$mb" --max-queue-delay-us "$delay" --overlap-batches "$overlap" --engine-file "$out/torch/resnet50.onnx" \
      --bind-address 127.0.0.1 --port "$PORT" --poll-mode hybrid -i 0 > "$log" 2>&1 &
    server=$!
    up=0
    for _ in $(seq 1 240); do
      if grep -q "listening on" "$log"; then up=1; break; fi
      kill -0 "$server" 2>/dev/null || break
      sleep 0.5
    done
    if [ "$up" -eq 1 ]; then
      grep -iE "nvJPEG hardware|hybrid decode" "$log" | head -2 || true
      level "$name.jpeg_c1" jpeg 1 -i "$jpeg"
      level "$name.jpeg_c64" jpeg 64 -i "$jpeg"
      if [ "$first" -eq 1 ]; then
        level "$name.processed_c64" processed 64 -i "$jpeg"
        level "$name.echo_tensor_c64" echo 64 --payload-size 602144
        level "$name.echo_jpeg_c64" echo 64 --payload-size "$(stat -c %s "$jpeg")"
      fi
    else
      notes+=("zmq_server $name did not come up (see $log)")
      tail -5 "$log" || true
    fi
    stop_server
    grep -E "requests per GPU|stopped|decoded" "$log" || true
    PORT=$((PORT + 1))
    first=0
  done
fi
trap - EXIT

echo "=== 7. GPUDirect: -a 0 vs -a 1 server time per request (loopback ring source)"
if ! step gpudirect; then
  echo "(skipped: STEPS)"
elif [ -x "$bin/bench_gpudirect" ]; then
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
  if [ -f "$out/bench_decode.txt" ]; then
    echo
    sed -n '/^bench_decode:/,$p' "$out/bench_decode.txt"
  fi
  "$py" scripts/bench_gpu_summary.py "$out" || echo "!!!!!!!! bench_gpu_summary.py failed"
  if [ -f "$out/bench_gpudirect.txt" ]; then
    echo
    sed -n '/^bench_gpudirect:/,$p' "$out/bench_gpudirect.txt"
  fi
  for n in ${notes[@]+"${notes[@]}"}; do echo "!!!!!!!! $n"; done
  echo "files: $out"
} | tee "$out/summary.txt"

#!/usr/bin/env bash
# One command for a loopback sweep: starts zmq_server on 127.0.0.1, sweeps it by concurrency
# (closed loop) and by Poisson rate (open loop) with multi_client's in-process load
# generator, and leaves both results folders (run.json, load_summary.csv, requests.csv,
# resources.csv; docs/results.md) under OUT, with the server's own resources.csv beside them.
#
#   scripts/sweep_loopback.sh [OUT]                 # default results/sweep-<UTC time>
#   TASK=6 PAYLOAD=1024 CONCURRENCY=1:64:16 RATES=1000:5000:2000 scripts/sweep_loopback.sh
#
# BIN=target/debug skips the release build (binaries already built there).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/sweep-$(date -u +%Y%m%dT%H%M%SZ)}
BIN=${BIN:-}
MODEL=${MODEL:-models/resnet50.onnx}
TASK=${TASK:-4}
PAYLOAD=${PAYLOAD:-}
CONNECTIONS=${CONNECTIONS:-64}
CONCURRENCY=${CONCURRENCY:-1:64:21}
RATES=${RATES:-2:10:4}
INTERVAL_MS=${INTERVAL_MS:-5000}
TRIALS=${TRIALS:-10}
PORT=${PORT:-5599}
if [ -z "$BIN" ]; then
  cargo build --release --bin zmq_server --bin multi_client --bin gen_models
  BIN=target/release
fi
[ -f "$MODEL" ] || "$BIN/gen_models" --out-dir "$(dirname "$MODEL")"
mkdir -p "$OUT"
# The server pins its receive loop to core 0; the load generator starts at core 1.
"$BIN/zmq_server" --bind-address 127.0.0.1 --port "$PORT" --engine-file "$MODEL" \
  --poll-mode block -i 0 -s -f "$OUT/server" --total-requests 0 >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening on" "$OUT/server.log" && break; sleep 0.2; done
grep -q "listening on" "$OUT/server.log" || { cat "$OUT/server.log"; exit 1; }
payload=()
[ -n "$PAYLOAD" ] && payload=(--payload-size "$PAYLOAD")
common=(--host 127.0.0.1 -p "$PORT" -t "$TASK" "${payload[@]}" -c "$CONNECTIONS"
  --measurement-interval "$INTERVAL_MS" --max-trials "$TRIALS" --first-core 1
  --server-pid "$SERVER" -s)
"$BIN/multi_client" "${common[@]}" --depth 1 --concurrency-range "$CONCURRENCY" \
  -f "$OUT/concurrency" | tee "$OUT/concurrency.txt"
"$BIN/multi_client" "${common[@]}" --depth 4 --request-rate-range "$RATES" \
  --request-distribution poisson -f "$OUT/rate" | tee "$OUT/rate.txt"
echo "results: $OUT/{concurrency,rate,server}"

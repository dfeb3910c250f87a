#!/usr/bin/env bash
# The main job on embedded defaults: build, generate the models (no download), start a
# zmq_server on 127.0.0.1 with the CPU backend, send REQUESTS images of models/grace_hopper.jpg
# with zmq_client, print the latency table, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-50}
MODEL=${MODEL:-models/resnet50.onnx}
PORT=${PORT:-5555}
cargo build --release --bins
[ -f models/resnet50.onnx ] && [ -f models/resnet_tiny.onnx ] || ./target/release/gen_models --out-dir models
./target/release/zmq_server --bind-address 127.0.0.1 --port "$PORT" --engine-file "$MODEL" \
  --threads "$(nproc)" --poll-mode block -i 5 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
sleep 2
./target/release/zmq_client --host 127.0.0.1 --port "$PORT" -i models/grace_hopper.jpg \
  -t jpeg --warmup 3 -r "$REQUESTS" -s -f results/demo

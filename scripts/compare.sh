#!/usr/bin/env bash
# The paper's comparison in one command: the same workloads over TCP (ZeroMQ) and RDMA, at a
# few load levels (closed loop by concurrency, open loop by Poisson rate), each run a results
# folder (run.json, load_summary.csv, requests.csv, resources.csv; docs/results.md), then the
# figures drawn from all of them by `report`.
#
#   scripts/compare.sh OUT                 # parts "loopback vm" (and "gpu" where nvidia-smi works), then draws
#   scripts/compare.sh OUT vm draw         # only some parts
#
# Parts:
#   loopback  zmq_server + multi_client on this host's 127.0.0.1 (TCP through the kernel).
#   vm        inside the Soft-RoCE VM (tests/testbed/, one boot): ZeroMQ over the guest's TCP and
#             RDMA over rxe, same workloads, same emulated CPUs, so the two compare with each
#             other (not with the loopback part: TCG runs the guest several times slower).
#   gpu       on a GPU machine: zmq_server --backend gpu, the processed task (602 KB tensors)
#             and the jpeg task; and bench_gpudirect's rdma_server -a 0 (host ring + upload)
#             against -a 1 (GPU-resident, loopback ring source) as two results folders.
#   draw      report over every folder under OUT (figures in OUT/figures).
# Workloads (loopback and vm): ping (header only: the transport's floor) and echo of a
# 602,112-byte payload (the processed task's tensor: what -t 2 moves, without inference,
# which the VM's emulated CPU could not do at any useful rate).
#
# BIN (default target/release, built if missing; the vm part runs whatever BIN holds),
# CONCURRENCY / PING_RATES / ECHO_RATES / INTERVAL_MS / TRIALS for the loopback levels,
# VM_CONCURRENCY / VM_PING_RATES / VM_ECHO_RATES / VM_COUNT for the VM's (request-count
# windows: TCG time is not wall time), GPU_CONCURRENCY / GPU_RATES for the gpu part's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/compare.sh OUT [loopback] [vm] [gpu] [draw]}
shift
parts=("$@")
if [ ${#parts[@]} -eq 0 ]; then
  parts=(loopback vm)
  command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && parts+=(gpu)
  parts+=(draw)
fi
BIN=${BIN:-target/release}
CONCURRENCY=${CONCURRENCY:-1:16:5}
PING_RATES=${PING_RATES:-500:2000:1500}
ECHO_RATES=${ECHO_RATES:-100:400:300}
INTERVAL_MS=${INTERVAL_MS:-1000}
TRIALS=${TRIALS:-5}
VM_CONCURRENCY=${VM_CONCURRENCY:-1:4:3}
VM_PING_RATES=${VM_PING_RATES:-50:150:100}
VM_ECHO_RATES=${VM_ECHO_RATES:-10:30:20}
VM_COUNT=${VM_COUNT:-150}
ECHO_BYTES=602112
MODEL=${MODEL:-models/resnet_tiny.onnx}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

need() {
  local missing=()
  for b in "$@"; do [ -x "$BIN/$b" ] || missing+=("$b"); done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$BIN" = target/release ] && command -v cargo >/dev/null; then
      cargo build --release $(printf -- '--bin %s ' "${missing[@]}")
    else
      echo "compare.sh: missing in $BIN: ${missing[*]}" >&2
      exit 1
    fi
  fi
}

wait_listening() { # LOG
  for _ in $(seq 300); do grep -q "listening on" "$1" && return 0; sleep 0.2; done
  echo "compare.sh: the server did not start:" >&2
  cat "$1" >&2
  return 1
}

# sweep NAME SERVER_PID LOADGEN_ARGS...: a concurrency sweep and a Poisson sweep, two folders.
sweep() {
  local name=$1 pid=$2
  shift 2
  "$BIN/multi_client" "$@" --server-pid "$pid" --depth 1 --concurrency-range "$LEVELS_C" \
    -s -f "$OUT/$name-concurrency" >"$OUT/$name-concurrency.txt" 2>&1 \
    || { echo "compare.sh: $name concurrency sweep failed:" >&2; tail -20 "$OUT/$name-concurrency.txt" >&2; return 1; }
  "$BIN/multi_client" "$@" --server-pid "$pid" --depth 4 --request-rate-range "$LEVELS_R" \
    --request-distribution poisson -s -f "$OUT/$name-rate" >"$OUT/$name-rate.txt" 2>&1 \
    || { echo "compare.sh: $name rate sweep failed:" >&2; tail -20 "$OUT/$name-rate.txt" >&2; return 1; }
  echo "== $name"
  sed -n '/^ level  /,$p' "$OUT/$name-concurrency.txt" | head -20
  sed -n '/^ level  /,$p' "$OUT/$name-rate.txt" | head -20
}

# pair zmq|rdma NAME HOST PORT TASK_ARGS...: a server of that transport on HOST:PORT, both
# sweeps over the matching client transport, the server stopped.
pair() {
  local kind=$1 name=$2 host=$3 port=$4
  shift 4
  local server=("$BIN/zmq_server" --port "$port") stop=INT
  if [ "$kind" = rdma ]; then
    server=("$BIN/rdma_server" -p "$port")
    stop=TERM
  fi
  "${server[@]}" --bind-address "$host" --engine-file "$MODEL" --poll-mode block -i 0 \
    -s -f "$OUT/$name-server" --total-requests 0 "${SERVER_EXTRA[@]}" \
    >"$OUT/$name-server.log" 2>&1 &
  local pid=$!
  wait_listening "$OUT/$name-server.log" || { kill $pid 2>/dev/null; return 1; }
  local status=0
  sweep "$name" $pid --host "$host" -p "$port" -a "${kind}_client" "${LOADGEN_EXTRA[@]}" "$@" || status=1
  kill -$stop $pid; wait $pid || true
  return $status
}

workloads() { # zmq|rdma PREFIX HOST PORT PING_RATES ECHO_RATES
  LEVELS_R=$5 pair "$1" "$2-ping" "$3" "$4" -t ping
  LEVELS_R=$6 pair "$1" "$2-echo602k" "$3" "$(($4 + 1))" -t echo --payload-size $ECHO_BYTES
}

for part in "${parts[@]}"; do
  case $part in
  loopback)
    need zmq_server multi_client gen_models
    [ -f "$MODEL" ] || "$BIN/gen_models" --out-dir "$(dirname "$MODEL")" --only tiny
    LEVELS_C=$CONCURRENCY SERVER_EXTRA=() \
      LOADGEN_EXTRA=(-c 16 --measurement-interval "$INTERVAL_MS" --max-trials "$TRIALS" --first-core 1)
    workloads zmq loopback-zmq 127.0.0.1 5610 "$PING_RATES" "$ECHO_RATES"
    ;;
  vm)
    need zmq_server rdma_server multi_client gen_models
    [ -f "$MODEL" ] || "$BIN/gen_models" --out-dir "$(dirname "$MODEL")" --only tiny
    mkdir -p "$OUT/vm"
    # One boot runs this script's vm-inside part; its folders come back through
    # HACSERVE_TESTBED_OUT (tests/testbed/README.md).
    HACSERVE_TESTBED_OUT="$OUT/vm" HACSERVE_TESTBED_ENV="BIN MODEL VM_CONCURRENCY VM_PING_RATES VM_ECHO_RATES VM_COUNT" \
      HACSERVE_TESTBED_TIMEOUT=${HACSERVE_TESTBED_TIMEOUT:-1500} \
      tests/testbed/run-in-vm.sh bash scripts/compare.sh /var/tmp/compare vm-inside </dev/null
    ;;
  vm-inside)
    # In the guest: both transports over the one rxe address, results then copied out.
    LEVELS_C=$VM_CONCURRENCY SERVER_EXTRA=(--no-pin) \
      LOADGEN_EXTRA=(-c 4 --threads 1 --poll-mode block --measurement-request-count "$VM_COUNT"
        --max-trials 3 --timeout-ms 60000 --log-capacity 20000)
    status=0
    workloads zmq vm-zmq 192.0.2.1 5620 "$VM_PING_RATES" "$VM_ECHO_RATES" || status=1
    workloads rdma vm-rdma 192.0.2.1 20090 "$VM_PING_RATES" "$VM_ECHO_RATES" || status=1
    if [ -n "${HACSERVE_TESTBED_OUT:-}" ]; then
      cp -r "$OUT"/. "$HACSERVE_TESTBED_OUT"/
    fi
    exit $status
    ;;
  gpu)
    need zmq_server multi_client gen_models bench_gpudirect
    GPU_MODEL=${GPU_MODEL:-models/resnet50.onnx}
    [ -f "$GPU_MODEL" ] || "$BIN/gen_models" --out-dir "$(dirname "$GPU_MODEL")" --only resnet50
    MODEL=$GPU_MODEL LEVELS_C=${GPU_CONCURRENCY:-1:64:21} LEVELS_R=${GPU_RATES:-1000:4000:1500} \
      SERVER_EXTRA=(--backend gpu --workers 16) \
      LOADGEN_EXTRA=(-c 64 --threads 2 --measurement-interval "$INTERVAL_MS" --max-trials "$TRIALS")
    pair zmq gpu-zmq-processed 127.0.0.1 5630 -t processed
    pair zmq gpu-zmq-jpeg 127.0.0.1 5631 -t jpeg
    "$BIN/bench_gpudirect" --engine-file "$GPU_MODEL" --save-folder "$OUT/gpu-gpudirect" \
      >"$OUT/gpu-gpudirect.txt" 2>&1 || { echo "compare.sh: bench_gpudirect failed:" >&2; tail -20 "$OUT/gpu-gpudirect.txt" >&2; }
    ;;
  draw)
    need report
    mapfile -t folders < <(find "$OUT" -name run.json -printf '%h\n' | grep -Ev -- '-server(_[0-9]+)?$' | sort)
    [ ${#folders[@]} -gt 0 ] || { echo "compare.sh: no results folders under $OUT" >&2; exit 1; }
    "$BIN/report" --out "$OUT/figures" "${folders[@]}"
    ;;
  *)
    echo "compare.sh: unknown part $part (loopback, vm, gpu, draw)" >&2
    exit 2
    ;;
  esac
done

#!/usr/bin/env bash
# Build here, run on a GPU machine without a Rust toolchain: release role binaries and the GPU
# test binaries, stripped, in one tarball (target/gpu-carry/hacserve-gpu.tar.xz, xz: the limit on what travels is 64 MiB).
#
# On the GPU machine, from a copy of this working tree:
#   scripts/gpu_bundle.sh unpack     # binaries into target/release, tests into target/gpu-tests
#   scripts/gpu_bundle.sh test       # every GPU test binary, --nocapture
#   scripts/bench_gpu.sh OUT         # the GPU benchmark
# BINS / TESTS (env) build a subset, e.g. BINS="bench_gpudirect" TESTS="-p hacserve --test
# gpudirect_loopback" for the GPUDirect loopback test and benchmark alone.
# Test binaries carry this checkout's absolute path (CARGO_MANIFEST_DIR, CARGO_BIN_EXE_*):
# `unpack` links that path to the copy when it does not exist there.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=target/gpu-carry
built=${CARGO_TARGET_DIR:-target}/release
case "${1:-build}" in
build)
  read -r -a bins <<< "${BINS:-zmq_server zmq_client multi_client bench_gpu bench_decode bench_gpudirect gen_models}"
  read -r -a tests <<< "${TESTS:--p hacserve-runtime --test gpu_engine --test gpu_preprocess --test gpu_torch_reference -p hacserve-ffi --test nvjpeg_gpu --test dmabuf_gpu --test landing_gpu -p hacserve --test gpu_server --test gpudirect_loopback}"
  cargo build --release $(printf -- '--bin %s ' "${bins[@]}")
  rm -rf "$carry" && mkdir -p "$carry/stage/bin" "$carry/stage/tests"
  cargo test --release --no-run --message-format=json "${tests[@]}" > "$carry/tests.json"
  for b in "${bins[@]}"; do cp "$built/$b" "$carry/stage/bin/"; done
  python3 - "$carry/tests.json" "$carry/stage/tests" <<'EOF'
import json, shutil, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], f"{sys.argv[2]}/{m['target']['name']}")
EOF
  strip "$carry"/stage/bin/* "$carry"/stage/tests/*
  echo "$PWD" > "$carry/stage/built-in"
  (cd "$built/.." && pwd) > "$carry/stage/target-dir"
  XZ_OPT="-6 -T0" tar -C "$carry/stage" -cJf "$carry/hacserve-gpu.tar.xz" .
  rm -rf "$carry/stage"
  ls -la "$carry"
  ;;
unpack)
  mkdir -p target/release target/gpu-tests
  tmp=$(mktemp -d)
  tar -C "$tmp" -xJf "$carry/hacserve-gpu.tar.xz"
  cp "$tmp"/bin/* target/release/
  cp "$tmp"/tests/* target/gpu-tests/
  # Paths compiled into the tests: the checkout and the target dir (CARGO_BIN_EXE_*).
  for pair in "$(cat "$tmp/built-in"):$PWD" "$(cat "$tmp/target-dir"):$PWD/target"; do
    from=${pair%%:*} to=${pair#*:}
    if [ "$from" != "$to" ] && [ ! -e "$from" ]; then
      mkdir -p "$(dirname "$from")" && ln -s "$to" "$from"
    fi
  done
  rm -rf "$tmp"
  ;;
test)
  status=0
  for t in target/gpu-tests/*; do
    echo "=== $(basename "$t")"
    HACSERVE_REPO=$PWD "$t" --nocapture --test-threads 1 || status=1
  done
  exit $status
  ;;
*)
  echo "usage: $0 [build|unpack|test]" >&2
  exit 2
  ;;
esac

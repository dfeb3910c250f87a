#!/usr/bin/env bash
# Runs one fuzz target under afl.rs for a fixed time and prints what it did (docs/fuzzing.md):
#
#   scripts/fuzz.sh <wire|rdma_handshake|jpeg> <seconds> [more afl-fuzz options]
#
# Installs cargo-afl from crates.io if it is missing and lets it build its own AFL++ (stable
# Rust is enough: without the LLVM plugins afl.rs instruments with rustc's sanitizer
# coverage). Builds fuzz/ (its own workspace) into fuzz/target, never into CARGO_TARGET_DIR:
# instrumentation changes every crate. Seeds: fuzz/corpus/<target>/; findings:
# fuzz/out/<target>/default/{crashes,hangs}/ (the folder is emptied at each run, unless
# FUZZ_RESUME=1: then afl-fuzz goes on from the previous run's queue and findings).
# Exit status: 0 when the run found no crash, 1 when it did, 2 on a usage or setup error.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
usage() {
  echo "usage: $0 <wire|rdma_handshake|jpeg> <seconds> [afl-fuzz options]" >&2
  exit 2
}
[ $# -ge 2 ] || usage
target=$1 seconds=$2
shift 2
case "$target" in
  wire | rdma_handshake) limits=(-t 1000) ;;
  # The server's own pixel limit (preprocess::MAX_IMAGE_PIXELS, 8192x8192) bounds the
  # decoder's buffers: about 0.45 GB at the largest. The memory limit catches anything
  # beyond that, and the timeout lets a legitimately large image finish decoding.
  jpeg) limits=(-t 3000 -m 2048) ;;
  *) usage ;;
esac
[[ "$seconds" =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] || usage

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo-afl >/dev/null; then
  echo "== installing cargo-afl (crates.io)" >&2
  cargo install --locked cargo-afl --version 0.18.2
fi
# Builds AFL++ from the source cargo-afl ships, once per rustc; says so when done already.
cargo afl config --build >/dev/null 2>&1 || true
export CARGO_TARGET_DIR="$root/fuzz/target"
echo "== building fuzz target $target (afl-instrumented, $CARGO_TARGET_DIR)" >&2
(cd "$root/fuzz" && cargo afl build --release --bin "$target")

out="$root/fuzz/out/$target"
input="$root/fuzz/corpus/$target"
if [ "${FUZZ_RESUME:-0}" = 1 ] && [ -f "$out/default/fuzzer_stats" ]; then
  input=-
else
  rm -rf "$out"
  mkdir -p "$out"
fi
# No UI (logs instead), no CPU binding (shared machines), and no refusal when the
# kernel hands core dumps to a helper: crashes are still seen by their signal.
export AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
echo "== afl-fuzz $target for ${seconds}s" >&2
cargo afl fuzz -i "$input" -o "$out" -V "$seconds" "${limits[@]}" "$@" \
  "$CARGO_TARGET_DIR/release/$target" >"$out/afl-fuzz.log" 2>&1 || {
  tail -30 "$out/afl-fuzz.log" >&2
  echo "afl-fuzz failed (log: $out/afl-fuzz.log)" >&2
  exit 2
}

stats="$out/default/fuzzer_stats"
stat() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
crashes=$(stat saved_crashes)
echo "target:     $target"
echo "run time:   $(stat run_time) s"
echo "execs:      $(stat execs_done)"
echo "exec/s:     $(stat execs_per_sec) (whole run)"
echo "corpus:     $(stat corpus_count) inputs ($(stat corpus_found) found, from $(ls "$root/fuzz/corpus/$target" | wc -l) seeds)"
echo "coverage:   $(stat edges_found) edges ($(stat bitmap_cvg) of the map), stability $(stat stability), $(stat cycles_done) queue cycles"
echo "crashes:    $crashes"
echo "hangs:      $(stat saved_hangs)"
echo "findings:   $out/default/crashes $out/default/hangs"
[ "$crashes" = 0 ]

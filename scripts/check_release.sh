#!/usr/bin/env bash
# Checks a release tarball made by scripts/release.sh, unpacked outside the build tree:
#  - SHA256SUMS matches, every role binary has its .debug file and a gnu-debuglink;
#  - each binary's dynamic needs (readelf -d) are glibc's own libraries only, its symbol
#    versions (readelf -V, objdump -T) reach at most GLIBC_2.28, with no GLIBCXX/CXXABI;
#  - each binary answers --help and --version (exit 0); the roles that load libraries at run
#    time answer --check (0: can run here, 1: names what is missing; never a panic);
#  - the unpacked gen_models writes the tiny model, the unpacked zmq_server serves it on
#    loopback and the unpacked zmq_client gets replies to a few requests.
# Prints a table per binary (size, NEEDED, highest GLIBC version) and exits non-zero on any
# failure. Usage: scripts/check_release.sh [--run-only] dist/hacserve-<version>-x86_64-linux.tar.gz
# --run-only skips the readelf/objdump checks and runs the binaries only: how
# scripts/check_old_glibc.sh uses it inside an old distribution's root, which has no binutils.
set -uo pipefail
run_only=0
if [ "${1:-}" = --run-only ]; then run_only=1; shift; fi
tarball=${1:?usage: check_release.sh [--run-only] <tarball>}
tarball=$(realpath "$tarball")
roles=(zmq_server zmq_client zmq_balancer zmq_proxy rdma_server rdma_client rdma_proxy multi_client gen_models)
allowed_needed="libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 ld-linux-x86-64.so.2"
max_glibc=2.28
tools=(sha256sum tar)
[ "$run_only" = 1 ] || tools+=(readelf objdump)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || { echo "check_release.sh: $tool is missing" >&2; exit 2; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/hacserve-release-check.XXXXXX")
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill -INT "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT
failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }

tar -C "$work" -xzf "$tarball" || { echo "FAIL: cannot unpack $tarball" >&2; exit 1; }
pkg=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
[ -n "$pkg" ] || { echo "FAIL: $tarball holds no top-level folder" >&2; exit 1; }
echo "unpacked into $pkg"
(cd "$pkg" && sha256sum --quiet -c SHA256SUMS) || fail "SHA256SUMS does not match"
for f in README.md docs/design.md models/imagenet_classes.txt VERSION; do
  [ -f "$pkg/$f" ] || fail "$f is missing from the package"
done

# The dynamic section and symbol versions of bin/$2: fills $needed and $highest.
read_elf() {
  local role=$1 bin=$2
  # Into a variable first: `readelf | grep -q` fails under pipefail when grep stops reading
  # early and readelf gets SIGPIPE (seen on multi_client).
  local sections
  sections=$(readelf -S "$bin")
  grep -q '\.gnu_debuglink' <<<"$sections" || fail "$role: no .gnu_debuglink section"
  if grep -q '\.debug_info' <<<"$sections"; then fail "$role: not stripped (.debug_info present)"; fi
  needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
  for lib in $needed; do
    case " $allowed_needed " in
      *" $lib "*) ;;
      *) fail "$role: needs $lib (allowed: $allowed_needed)" ;;
    esac
  done
  versions=$( (readelf -V "$bin"; objdump -T "$bin") 2>/dev/null)
  if grep -Eq 'GLIBCXX|CXXABI' <<<"$versions"; then
    fail "$role: references GLIBCXX/CXXABI symbols: $(grep -Eo '(GLIBCXX|CXXABI)_[0-9.]+' <<<"$versions" | sort -uV | tr '\n' ' ')"
  fi
  highest=$(grep -Eo 'GLIBC_[0-9]+(\.[0-9]+)+' <<<"$versions" | sed 's/GLIBC_//' | sort -uV | tail -n1)
  if [ -n "$highest" ] && [ "$(printf '%s\n%s\n' "$highest" "$max_glibc" | sort -V | tail -n1)" != "$max_glibc" ]; then
    fail "$role: needs GLIBC_$highest (at most $max_glibc allowed): $(grep -Eo 'GLIBC_[0-9.]+' <<<"$versions" | sed 's/GLIBC_//' | sort -uV | awk -v m="$max_glibc" '{ split($0,a,"."); split(m,b,"."); if (a[1]>b[1] || (a[1]==b[1] && a[2]>b[2])) printf "%s ", $0 }')"
  fi
}

rows=()
for role in "${roles[@]}"; do
  bin="$pkg/bin/$role"
  if [ ! -x "$bin" ]; then
    fail "$role: bin/$role is missing"
    rows+=("$(printf '%-14s %10s  %-8s  %s' "$role" "-" "-" "missing")")
    continue
  fi
  [ -f "$bin.debug" ] || fail "$role: bin/$role.debug is missing"
  needed=- highest=-
  [ "$run_only" = 1 ] || read_elf "$role" "$bin"
  # Run from the work folder with a bare environment: nothing from the build tree can help.
  help_out=$(cd "$work" && env -i PATH=/usr/bin:/bin "$bin" --help 2>&1) || fail "$role --help exited non-zero: $help_out"
  grep -q "Usage:" <<<"$help_out" || fail "$role --help printed no usage"
  version_out=$(cd "$work" && env -i PATH=/usr/bin:/bin "$bin" --version 2>&1) || fail "$role --version exited non-zero: $version_out"
  [[ "$version_out" == "$role hacserve "* ]] || fail "$role --version printed: $version_out"
  size=$(stat -c %s "$bin")
  rows+=("$(printf '%-14s %10s  %-8s  %s' "$role" "$size" "${highest:-none}" "${needed% }")")
done

# --check: 0 or 1 with a report naming what it looked for; 101 would be a panic.
check_role() {
  local role=$1 expect=$2 out rc
  shift 2
  out=$(cd "$work" && env -i PATH=/usr/bin:/bin "$pkg/bin/$role" "$@" --check 2>&1)
  rc=$?
  echo "$role $* --check (exit $rc):"
  sed 's/^/  /' <<<"$out"
  [ "$rc" -le 1 ] || fail "$role $* --check exited $rc (0 or 1 expected)"
  grep -q "$expect" <<<"$out" || fail "$role $* --check did not report $expect"
  if grep -q "panicked" <<<"$out"; then fail "$role $* --check panicked"; fi
}
for role in rdma_server rdma_client rdma_proxy zmq_proxy; do check_role "$role" libibverbs; done
check_role zmq_server "CUDA driver" --backend gpu
check_role zmq_server "can run here"

# Loopback smoke test with the unpacked binaries only.
smoke() {
  cd "$work" || return 1
  env -i PATH=/usr/bin:/bin "$pkg/bin/gen_models" --out-dir "$work/models" --only tiny || { fail "gen_models --only tiny failed"; return 1; }
  env -i PATH=/usr/bin:/bin "$pkg/bin/zmq_server" --bind-address 127.0.0.1 --port 0 \
    --engine-file "$work/models/resnet_tiny.onnx" --classes-file "$pkg/models/imagenet_classes.txt" \
    --poll-mode block --no-pin > "$work/server.log" 2>&1 &
  server_pid=$!
  local endpoint=
  for _ in $(seq 1 300); do
    endpoint=$(grep -Eo 'listening on tcp://127\.0\.0\.1:[0-9]+' "$work/server.log" | head -n1)
    [ -n "$endpoint" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$endpoint" ]; then
    fail "zmq_server did not start: $(tail -n5 "$work/server.log")"
    return 1
  fi
  local port=${endpoint##*:}
  if ! env -i PATH=/usr/bin:/bin "$pkg/bin/zmq_client" --host 127.0.0.1 --port "$port" \
      -t jpeg -i "$pkg/models/grace_hopper_500x546.jpg" --classes-file "$pkg/models/imagenet_classes.txt" \
      -r 5 -f "$work/results" > "$work/client.log" 2>&1; then
    fail "zmq_client failed: $(tail -n5 "$work/client.log")"
    return 1
  fi
  echo "smoke: zmq_server on port $port answered zmq_client's 5 requests:"
  tail -n4 "$work/client.log" | sed 's/^/  /'
  kill -INT "$server_pid"
  wait "$server_pid" || fail "zmq_server exited non-zero after SIGINT: $(tail -n3 "$work/server.log")"
  server_pid=
}
smoke

printf '\n%-14s %10s  %-8s  %s\n' binary "size (B)" "GLIBC" NEEDED
printf '%s\n' "${rows[@]}"
if [ "$failures" -gt 0 ]; then
  echo "check_release.sh: $failures failure(s)" >&2
  exit 1
fi
echo "check_release.sh: all checks passed"

#!/usr/bin/env bash
# Builds every role binary for x86-64 Linux and packs
#   $HACSERVE_DIST_DIR/hacserve-<version>-x86_64-linux.tar.gz   (default dist/)
# Binaries are built with cargo-zigbuild for x86_64-unknown-linux-gnu.2.28: glibc symbols up
# to 2.28 (Ubuntu 20.04, RHEL 8 and newer), libzmq compiled by zig's clang and linked with
# zig's libc++ statically, so the only dynamic needs are glibc's own libraries. Each binary
# is stripped; its debug info is split into <binary>.debug beside it (gnu-debuglink, so gdb
# and perf find it). The package also holds README.md, docs/, models/imagenet_classes.txt, the
# sample image models/grace_hopper_500x546.jpg (the clients' default -i) and models/grace_hopper.jpg,
# VERSION (each binary's --version line) and SHA256SUMS. Check it with
# scripts/check_release.sh <tarball>.
#
# Needs: cargo-zigbuild and zig (`pip install cargo-zigbuild==0.24.1 ziglang==0.17.1`, as .ci/run
# does; or `cargo install cargo-zigbuild --locked` and zig on PATH),
# objcopy and strip (binutils).
# Environment: CARGO_TARGET_DIR (reused; default target/), HACSERVE_DIST_DIR (default dist/),
# HACSERVE_RELEASE_TARGET (default x86_64-unknown-linux-gnu.2.28), HACSERVE_RELEASE_PROFILE
# (default release; CI's check builds the cheaper release-check profile of Cargo.toml, same
# target and linkage, and its tarball is named ...-x86_64-linux-release-check.tar.gz so it is
# never taken for a release).
set -euo pipefail
cd "$(dirname "$0")/.."

roles=(zmq_server zmq_client zmq_balancer zmq_proxy rdma_server rdma_client rdma_proxy multi_client gen_models)
zig_target=${HACSERVE_RELEASE_TARGET:-x86_64-unknown-linux-gnu.2.28}
# cargo-zigbuild builds into the directory of the plain triple (the .2.28 suffix is its own).
triple=${zig_target%%.[0-9]*}
target_dir=${CARGO_TARGET_DIR:-target}
dist_dir=${HACSERVE_DIST_DIR:-dist}
profile=${HACSERVE_RELEASE_PROFILE:-release}
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
name="hacserve-${version}-x86_64-linux"
[ "$profile" = release ] || name="$name-$profile"

command -v cargo-zigbuild >/dev/null || { echo "release.sh: cargo-zigbuild is missing (cargo install cargo-zigbuild --locked)" >&2; exit 1; }
if ! command -v zig >/dev/null && ! python3 -c 'import ziglang' 2>/dev/null; then
  echo "release.sh: zig is missing (pip install ziglang, or zig on PATH)" >&2
  exit 1
fi
for tool in objcopy strip sha256sum tar; do
  command -v "$tool" >/dev/null || { echo "release.sh: $tool is missing" >&2; exit 1; }
done
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "release.sh: note: the tree has uncommitted changes; the stamp says -dirty only if build.rs reran" >&2
fi

bin_args=()
for role in "${roles[@]}"; do bin_args+=(--bin "$role"); done
start=$(date +%s)
cargo zigbuild --profile "$profile" --locked --target "$zig_target" "${bin_args[@]}"
build_s=$(( $(date +%s) - start ))
echo "release.sh: build ($profile profile) took ${build_s} s"

out="$target_dir/$triple/$profile"
stage="$dist_dir/$name"
rm -rf "$stage" "$dist_dir/$name.tar.gz"
mkdir -p "$stage/bin" "$stage/models"
for role in "${roles[@]}"; do
  src="$out/$role"
  [ -x "$src" ] || { echo "release.sh: $src was not built" >&2; exit 1; }
  dst="$stage/bin/$role"
  # Debug info beside the binary (compressed), then the stripped binary points at it.
  objcopy --only-keep-debug --compress-debug-sections=zlib "$src" "$dst.debug"
  strip --strip-debug --strip-unneeded -o "$dst" "$src"
  (cd "$stage/bin" && objcopy --add-gnu-debuglink="$role.debug" "$role")
  chmod 0755 "$dst"
  chmod 0644 "$dst.debug"
done
cp README.md "$stage/"
cp -r docs "$stage/docs"
cp models/imagenet_classes.txt models/grace_hopper.jpg models/grace_hopper_500x546.jpg "$stage/models/"
for role in "${roles[@]}"; do "$stage/bin/$role" --version; done > "$stage/VERSION"
(cd "$stage" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)
tar -C "$dist_dir" --owner=0 --group=0 -czf "$dist_dir/$name.tar.gz" "$name"
(cd "$dist_dir" && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
rm -rf "$stage"
echo "release.sh: $(du -h "$dist_dir/$name.tar.gz" | cut -f1) $dist_dir/$name.tar.gz (build ${build_s} s)"

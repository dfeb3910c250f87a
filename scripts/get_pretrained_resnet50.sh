#!/usr/bin/env bash
# Downloads the pretrained ResNet-50 v1 (opset 7) from the ONNX model zoo into
# models/resnet50-pretrained.onnx, for real ImageNet predictions instead of the random-weight
# models that gen_models writes.
#
# Needs internet access to github.com (the zoo stores the file with Git LFS; curl/wget follow the
# redirect to media.githubusercontent.com). NOT TESTED in the development sandbox, which has no
# internet: if the zoo moves the file again, pass its URL as the first argument.
#
# Why v1-7: plain Conv/BatchNormalization/Relu/MaxPool/Add/GlobalAveragePool/Gemm graph that tract
# runs as is, same ImageNet preprocessing as torchvision (mean/std normalised RGB, 224x224) and
# raw logits out. Its tensor names differ from ours ("data" in, "resnetv17_dense0_fwd" out);
# the tract loader goes by position, not by name, so that does not matter.
#
# Usage: scripts/get_pretrained_resnet50.sh [URL]
set -euo pipefail

cd "$(dirname "$0")/.."
out=models/resnet50-pretrained.onnx
urls=(
    "${1:-}"
    # Layout of onnx/models since 2023 ("validated/" tree).
    "https://github.com/onnx/models/raw/main/validated/vision/classification/resnet/model/resnet50-v1-7.onnx"
    # Older layout, kept as a fallback.
    "https://github.com/onnx/models/raw/main/vision/classification/resnet/model/resnet50-v1-7.onnx"
)
# The real file is ~98 MB; anything much smaller is an error page or an LFS pointer.
min_bytes=50000000

fetch() {
    local url=$1 dest=$2
    if command -v curl >/dev/null 2>&1; then
        curl --fail --location --retry 3 --connect-timeout 20 --output "$dest" "$url"
    elif command -v wget >/dev/null 2>&1; then
        wget --tries=3 --timeout=20 --output-document="$dest" "$url"
    else
        echo "error: neither curl nor wget is installed" >&2
        exit 1
    fi
}

mkdir -p models
tmp="$out.part"
trap 'rm -f "$tmp"' EXIT

for url in "${urls[@]}"; do
    [ -n "$url" ] || continue
    echo "downloading $url"
    rm -f "$tmp"
    if ! fetch "$url" "$tmp"; then
        echo "  failed, trying the next source" >&2
        continue
    fi
    size=$(wc -c <"$tmp")
    if [ "$size" -lt "$min_bytes" ]; then
        if head -c 100 "$tmp" | grep -q "git-lfs"; then
            echo "  got a Git LFS pointer ($size bytes), not the model" >&2
        else
            echo "  file is only $size bytes, not the model" >&2
        fi
        continue
    fi
    mv "$tmp" "$out"
    echo "wrote $out ($size bytes)"
    echo
    echo "Serve it with:"
    echo "  cargo run --release --bin zmq_server -- --engine-file $out"
    echo "Benchmark it with:"
    echo "  cargo run --release --bin bench_cpu_infer -- --model $out"
    exit 0
done

echo "error: could not download ResNet-50 from any source; pass a URL as the first argument" >&2
exit 1

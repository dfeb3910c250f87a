#!/usr/bin/env bash
# Regenerates fuzz/corpus/jpeg/ (committed; rerun only to change the seeds) from the
# project's own pictures: small crops and rescales of models/grace_hopper.jpg and
# tests/fixtures/jpeg_corpus/, one per JPEG feature the decoder has a path for.
# Needs libjpeg-turbo's tools: apt-get install -y libjpeg-turbo-progs.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$root/fuzz/corpus/jpeg
src=$root/models/grace_hopper.jpg
fixtures=$root/tests/fixtures/jpeg_corpus
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
rm -f "$out"/*.jpg
djpeg -scale 1/8 -ppm "$src" >"$tmp/small.ppm"           # 64x76 RGB
cjpeg -quality 75 "$tmp/small.ppm" >"$out/baseline_420.jpg"
cjpeg -quality 90 -sample 1x1 "$tmp/small.ppm" >"$out/baseline_444.jpg"
cjpeg -quality 90 -sample 2x1 "$tmp/small.ppm" >"$out/baseline_422.jpg"
cjpeg -quality 90 -sample 1x2 "$tmp/small.ppm" >"$out/baseline_440.jpg"
cjpeg -quality 75 -progressive "$tmp/small.ppm" >"$out/progressive.jpg"
cjpeg -quality 75 -optimize "$tmp/small.ppm" >"$out/optimized_huffman.jpg"
cjpeg -quality 75 -restart 1B "$tmp/small.ppm" >"$out/restart_every_mcu.jpg"
cjpeg -quality 75 -arithmetic "$tmp/small.ppm" >"$out/arithmetic.jpg"
cjpeg -quality 75 -grayscale "$tmp/small.ppm" >"$out/gray.jpg"
cjpeg -quality 75 -grayscale -progressive "$tmp/small.ppm" >"$out/gray_progressive.jpg"
cjpeg -quality 75 -rgb "$tmp/small.ppm" >"$out/rgb_no_ycc.jpg"
# Odd sizes: partial MCUs on both axes, a 1x1 image, a long thin one.
printf 'P6\n17 3\n255\n' >"$tmp/odd.ppm"; head -c $((17 * 3 * 3)) "$tmp/small.ppm" | tail -c $((17 * 3 * 3)) >>"$tmp/odd.ppm"
cjpeg -quality 75 "$tmp/odd.ppm" >"$out/odd_17x3.jpg"
printf 'P6\n1 1\n255\n\x80\x40\xc0' >"$tmp/one.ppm"
cjpeg -quality 75 "$tmp/one.ppm" >"$out/one_pixel.jpg"
printf 'P6\n300 1\n255\n' >"$tmp/thin.ppm"; head -c 900 /dev/zero | tr '\0' '\177' >>"$tmp/thin.ppm"
cjpeg -quality 50 "$tmp/thin.ppm" >"$out/thin_300x1.jpg"
# Lossless crops of the fixtures keep their own coding (CMYK, Pillow's progressive, gray).
jpegtran -crop 48x48+96+96 -copy none "$fixtures/cmyk.jpg" >"$out/cmyk_crop.jpg"
jpegtran -crop 48x48+96+96 -copy all "$fixtures/progressive.jpg" >"$out/pillow_progressive_crop.jpg"
jpegtran -crop 40x24+0+0 "$fixtures/gray.jpg" >"$out/pillow_gray_crop.jpg"
jpegtran -crop 32x32+160+160 "$fixtures/yuv444.jpg" >"$out/pillow_444_crop.jpg"
ls -l "$out"

#!/usr/bin/env python3
"""Writes the reference data for runtime/tests/preprocess_reference.rs.

The reference is torchvision's ImageNet eval transform
    Resize(256) -> CenterCrop(224) -> ToTensor() -> Normalize(mean, std)
re-implemented with Pillow + numpy only (no torch needed), following torchvision's
own formulas: `_compute_resized_output_size` (long side = int(256 * long / short)),
`img.resize(size, Image.BILINEAR)` for PIL inputs, and
`int(round((h - 224) / 2.0))` for the crop offsets.

Outputs (runtime/tests/fixtures/, ~300 KB in total):
  grace_hopper_crop224.rgb  PIL's 224x224x3 uint8 crop (HWC) of models/grace_hopper.jpg
                            after decode + resize, before normalisation.
  resize_<name>.rgb         PIL's bilinear resize (HWC uint8) of small synthetic images;
                            the inputs are generated procedurally (see `synth`, mirrored
                            in the Rust test) so they need not be committed.
  preprocess_reference.json sizes, offsets, exact normalised samples, per-channel stats.

Usage: pip install pillow numpy && python3 scripts/make_preprocess_fixture.py
"""

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, features

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "runtime" / "tests" / "fixtures"
IMAGE = ROOT / "models" / "grace_hopper.jpg"

RESIZE_SHORTER = 256
INPUT_SIZE = 224
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

# (name, src_w, src_h, dst_w, dst_h, seed): upscale, the ~1.67x downscale that
# Resize(256) applies to VGA-sized photos, a strong 8x downscale (wide filter
# support) and an anisotropic one. Outputs stay small to keep the fixture light.
RESIZE_CASES = [
    ("up", 90, 60, 144, 96, 1),
    ("down", 241, 161, 144, 96, 2),
    ("down8", 640, 480, 80, 60, 3),
    ("aniso", 333, 77, 50, 20, 4),
]

# Small JPEGs (made from the test photo) for decoder paths the photo itself does not
# take: (name, width, height, PIL mode, save options). Odd sizes leave partial MCUs.
DECODER_CASES = [
    ("gray", 64, 75, "L", {"quality": 90}),
    ("progressive", 96, 113, "RGB", {"quality": 90, "progressive": True}),
    ("cmyk", 48, 57, "CMYK", {"quality": 90}),
    ("444", 57, 67, "RGB", {"quality": 90, "subsampling": 0}),
    ("422", 59, 70, "RGB", {"quality": 90, "subsampling": 1}),
]
GRID = 4

# Sizes whose crop offsets exercise Python's round-half-to-even.
GEOMETRY_CASES = [
    (512, 600), (640, 427), (427, 640), (500, 375), (341, 256), (343, 256),
    (256, 256), (200, 150), (4000, 3000), (1, 300), (300, 1), (1023, 1000),
]


def mask32(v):
    return v & np.uint64(0xFFFFFFFF)


def synth(w, h, seed):
    """Deterministic RGB8 test image: per-channel gradients, hard-edged
    checkerboards (so a resizer without antialiasing shows) and hash noise.
    Must stay bit-identical to `synth` in runtime/tests/preprocess_reference.rs."""
    y, x, c = np.meshgrid(
        np.arange(h, dtype=np.uint64),
        np.arange(w, dtype=np.uint64),
        np.arange(3, dtype=np.uint64),
        indexing="ij",
    )
    v = mask32(
        x * np.uint64(0x9E3779B1)
        + y * np.uint64(0x85EBCA77)
        + c * np.uint64(0xC2B2AE3D)
        + np.uint64(seed) * np.uint64(0x27D4EB2F)
    )
    v ^= v >> np.uint64(15)
    v = mask32(v * np.uint64(0x2C1B3C6D))
    v ^= v >> np.uint64(12)
    v = mask32(v * np.uint64(0x297A2D39))
    v ^= v >> np.uint64(15)
    noise = v % np.uint64(49)
    grad = (x * (np.uint64(97) + np.uint64(40) * c)) // np.uint64(w) + (
        y * (np.uint64(131) - np.uint64(30) * c)
    ) // np.uint64(h)
    cell = x // (np.uint64(5) + np.uint64(2) * c) + y // (np.uint64(7) - c)
    edge = np.where(cell % np.uint64(2) == 0, np.uint64(64), np.uint64(0))
    return np.minimum(grad + edge + noise, np.uint64(255)).astype(np.uint8)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def resized_size(w, h, size=RESIZE_SHORTER):
    # torchvision.transforms.functional._compute_resized_output_size, int `size`.
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def crop_offset(w, h, crop=INPUT_SIZE):
    # torchvision.transforms.functional.center_crop (image larger than crop).
    return int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))


def block_means(rgb, grid=GRID):
    """Per-channel means over a grid x grid partition (integer bounds, floor(i*len/grid))."""
    h, w, _ = rgb.shape
    out = []
    for gy in range(grid):
        for gx in range(grid):
            y0, y1 = gy * h // grid, (gy + 1) * h // grid
            x0, x1 = gx * w // grid, (gx + 1) * w // grid
            block = rgb[y0:y1, x0:x1].astype(np.float64)
            out.append([round(float(block[..., c].mean()), 3) for c in range(3)])
    return out


def to_tensor_normalize(crop_hwc):
    # ToTensor (float32 / 255) then Normalize ((x - mean) / std) in float32, CHW.
    x = crop_hwc.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def main():
    FIXTURES.mkdir(parents=True, exist_ok=True)

    # torchvision's default_loader: Image.open + convert("RGB").
    with Image.open(IMAGE) as im:
        img = im.convert("RGB")
    w, h = img.size
    rw, rh = resized_size(w, h)
    resized = img.resize((rw, rh), Image.BILINEAR)
    left, top = crop_offset(rw, rh)
    crop = np.asarray(resized.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE)))
    assert crop.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    crop_bytes = crop.tobytes()
    (FIXTURES / "grace_hopper_crop224.rgb").write_bytes(crop_bytes)

    tensor = to_tensor_normalize(crop)
    decoded = np.asarray(img)
    positions = [
        (0, 0, 0), (1, 0, 0), (2, 0, 0), (0, 223, 223), (1, 223, 223), (2, 223, 223),
        (0, 112, 112), (1, 112, 112), (2, 112, 112), (0, 17, 200), (1, 150, 31),
        (2, 99, 5), (0, 60, 140), (1, 201, 77), (2, 33, 180),
    ]
    grace = {
        "image": "models/grace_hopper.jpg",
        "image_sha256": hashlib.sha256(IMAGE.read_bytes()).hexdigest(),
        "decoded_size": [w, h],
        "decoded_channel_mean": [float(decoded[..., c].mean(dtype=np.float64)) for c in range(3)],
        "resized_size": [rw, rh],
        "crop_offset": [left, top],
        "crop_file": "grace_hopper_crop224.rgb",
        "crop_fnv1a64": f"{fnv1a64(crop_bytes):016x}",
        # [channel, row, column, value]; values are float32 printed exactly.
        "samples": [[c, y, x, float(tensor[c, y, x])] for c, y, x in positions],
        "channel_mean": [float(tensor[c].mean(dtype=np.float64)) for c in range(3)],
        "channel_std": [float(tensor[c].std(dtype=np.float64)) for c in range(3)],
    }

    cases = []
    for name, sw, sh, dw, dh, seed in RESIZE_CASES:
        src = synth(sw, sh, seed)
        out = np.asarray(Image.fromarray(src, "RGB").resize((dw, dh), Image.BILINEAR))
        assert out.shape == (dh, dw, 3)
        fname = f"resize_{name}.rgb"
        (FIXTURES / fname).write_bytes(out.tobytes())
        cases.append({
            "name": name, "src_size": [sw, sh], "dst_size": [dw, dh], "seed": seed,
            "src_fnv1a64": f"{fnv1a64(src.tobytes()):016x}", "file": fname,
        })

    decoder_cases = []
    for name, dw, dh, mode, opts in DECODER_CASES:
        small = img.resize((dw, dh), Image.BILINEAR).convert(mode)
        fname = f"decoder_{name}.jpg"
        small.save(FIXTURES / fname, "JPEG", **opts)
        with Image.open(FIXTURES / fname) as im:
            pil_rgb = np.asarray(im.convert("RGB"))
        decoder_cases.append({
            "name": name, "file": fname, "mode": mode, "size": [dw, dh],
            "rgb_mean": [float(pil_rgb[..., c].mean(dtype=np.float64)) for c in range(3)],
            "grid": GRID, "block_means": block_means(pil_rgb),
        })

    geometry = []
    for gw, gh in GEOMETRY_CASES:
        rw2, rh2 = resized_size(gw, gh)
        geometry.append({"src_size": [gw, gh], "resized_size": [rw2, rh2],
                         "crop_offset": list(crop_offset(rw2, rh2))})

    meta = {
        "generator": "scripts/make_preprocess_fixture.py",
        "pillow": Image.__version__,
        "numpy": np.__version__,
        "libjpeg_turbo": features.version_feature("libjpeg_turbo"),
        "mean": MEAN,
        "std": STD,
        "grace_hopper": grace,
        "resize_cases": cases,
        "decoder_cases": decoder_cases,
        "geometry": geometry,
    }
    text = json.dumps(meta, indent=1)
    # Keep lists of scalars on one line: the file stays small and readable.
    text = re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    (FIXTURES / "preprocess_reference.json").write_text(text + "\n")
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    print(f"wrote {FIXTURES} ({total} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The end-to-end and decode tables of scripts/bench_gpu.sh, with the goals of the GPU-speed
issue next to the figures, read from what the steps wrote under OUT_DIR:

  OUT_DIR/e2e/<config>.<task>_c<outstanding>/load_summary.csv   multi_client (docs/results.md)
  OUT_DIR/decode.jsonl                                          bench_decode
  OUT_DIR/torch_decode.jsonl                                    torch_peer.py decode-batch

Usage: scripts/bench_gpu_summary.py OUT_DIR   (prints; exit 0 unless OUT_DIR is unreadable)
"""

import csv
import glob
import json
import os
import sys

GOAL_JPEG64_RPS = 15000.0
GOAL_JPEG64_P99_MS = 10.0
GOAL_JPEG1_P50_MS = 0.6


def load_levels(e2e):
    rows = []
    for path in sorted(glob.glob(os.path.join(e2e, "*", "load_summary.csv"))):
        tag = os.path.basename(os.path.dirname(path))
        config, _, what = tag.partition(".")
        task, _, c = what.rpartition("_c")
        with open(path) as f:
            for r in csv.DictReader(f):
                rows.append((config, task, int(c), r))
    return rows


def num(r, key):
    try:
        return float(r[key])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def met(ok):
    return "MET" if ok else "NOT MET"


def e2e_table(rows):
    print()
    print("end to end: zmq_server --backend gpu --precision fp16 over loopback, multi_client in-process")
    print("closed loop (load generator on the same machine); config = decode_workers_max-batch_max-queue-delay-us_overlap")
    print(
        f" {'config':<24} {'task':<12} {'outst.':>6} {'stable':>6} {'req/s':>9} {'p50[ms]':>8} {'p99[ms]':>8}"
        f" {'errors':>6} {'srv cpu-s/1k':>12} {'queue':>7} {'decode':>7} {'prep':>6} {'infer':>7} [us, mean]"
    )
    for config, task, c, r in rows:
        print(
            f" {config:<24} {task:<12} {c:>6} {r.get('stable', ''):>6} {num(r, 'throughput_rps'):>9.0f}"
            f" {num(r, 'p50_us') / 1e3:>8.3f} {num(r, 'p99_us') / 1e3:>8.3f} {r.get('errors', ''):>6}"
            f" {r.get('server_cpu_s_per_1000') or '-':>12} {num(r, 'queue_us'):>7.0f} {num(r, 'decode_us'):>7.0f}"
            f" {num(r, 'preprocess_us'):>6.0f} {num(r, 'infer_us'):>7.0f}"
        )
    print()
    print("goals (issue: GPU serving at the GPU's speed, part 5):")
    by = {(cfg, task, c): r for cfg, task, c, r in rows}
    configs = []
    for cfg, _, _, _ in rows:
        if cfg not in configs:
            configs.append(cfg)
    for cfg in configs:
        r64 = by.get((cfg, "jpeg", 64))
        r1 = by.get((cfg, "jpeg", 1))
        if r64 is not None:
            rps, p99 = num(r64, "throughput_rps"), num(r64, "p99_us") / 1e3
            ok = rps >= GOAL_JPEG64_RPS and p99 <= GOAL_JPEG64_P99_MS
            print(
                f" {cfg:<24} JPEG, 64 outstanding: {rps:.0f} req/s (goal >= {GOAL_JPEG64_RPS:.0f}),"
                f" p99 {p99:.2f} ms (goal <= {GOAL_JPEG64_P99_MS:.0f}): {met(ok)}"
            )
        if r1 is not None:
            p50 = num(r1, "p50_us") / 1e3
            print(
                f" {cfg:<24} JPEG, 1 client: p50 {p50:.3f} ms (goal <= {GOAL_JPEG1_P50_MS}):"
                f" {met(p50 <= GOAL_JPEG1_P50_MS)}"
            )
        proc = by.get((cfg, "processed", 64))
        echo = by.get((cfg, "echo_tensor", 64))
        if proc is not None and echo is not None:
            p, e = num(proc, "throughput_rps"), num(echo, "throughput_rps")
            share = p / e if e > 0 else float("nan")
            print(
                f" {cfg:<24} processed (602,144 B), 64 outstanding: {p:.0f} req/s vs the echo task's"
                f" {e:.0f} req/s at the same size (transport ceiling): {share:.0%} of it"
                f" ({met(share >= 0.9)} at >= 90%)"
            )
        ej = by.get((cfg, "echo_jpeg", 64))
        if ej is not None and r64 is not None:
            print(
                f" {cfg:<24} echo of the JPEG's size, 64 outstanding: {num(ej, 'throughput_rps'):.0f} req/s"
                f" (the JPEG task's transport ceiling)"
            )


def read_jsonl(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def decode_table(out):
    ours = read_jsonl(os.path.join(out, "decode.jsonl"))
    torch = read_jsonl(os.path.join(out, "torch_decode.jsonl"))
    if not ours and not torch:
        return
    print()
    print("decode images/s: ours (bench_decode: GPU paths = decode + preprocessing kernel) vs")
    print("torchvision.io.decode_jpeg(list, device='cuda') (decode only), same files, same run")
    images = []
    for r in ours:
        name = r["image"].split(" ")[0]
        if name not in images:
            images.append(name)
    for r in torch:
        if r["image"] not in images:
            images.append(r["image"])
    batches = sorted({r["batch"] for r in ours if r["path"] != "cpu"} | {r["batch"] for r in torch})
    threads = sorted({r["threads"] for r in ours})
    cols = []
    for t in threads:
        for path in ("hardware", "hybrid"):
            cols.append((path, t))
    head = "".join(f" {p[:4]}x{t:<3}" for p, t in cols)
    print(f" {'image':<26} {'batch':>5}{head} {'cpu x1':>8} {'cpu xN':>8} {'torch':>8}")
    for img in images:
        for b in batches:
            def ours_of(path, t, batch):
                for r in ours:
                    if r["image"].split(" ")[0] == img and r["path"] == path and r["threads"] == t and r["batch"] == batch:
                        return r["images_s"]
                return None

            cells = []
            for path, t in cols:
                v = ours_of(path, t, b)
                cells.append(f" {v:>8.0f}" if v is not None else f" {'-':>8}")
            cpu1 = ours_of("cpu", threads[0], 1) if b == batches[0] else None
            cpun = ours_of("cpu", threads[-1], 1) if b == batches[0] else None
            tv = next((r["images_s"] for r in torch if r["image"] == img and r["batch"] == b), None)
            fmt = lambda v: f" {v:>8.0f}" if v is not None else f" {'-':>8}"
            print(f" {img:<26} {b:>5}{''.join(cells)}{fmt(cpu1)}{fmt(cpun)}{fmt(tv)}")
    print(" (hard/hybr xT = nvJPEG hardware / hybrid backend with T worker threads, each its own session)")


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[1]
    if not os.path.isdir(out):
        print(f"bench_gpu_summary.py: {out} is not a folder", file=sys.stderr)
        return 1
    decode_table(out)
    rows = load_levels(os.path.join(out, "e2e"))
    if rows:
        e2e_table(rows)
    else:
        print("\n(no end-to-end levels found)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

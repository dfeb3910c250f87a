#!/usr/bin/env python3
"""onnxruntime peer of bench_cpu_infer: same model, same input, per-image latency.

Prints exactly one machine-readable line, prefixed "ORT_JSON ", that bench_cpu_infer parses:
  {"ok": true, "ort_version": ..., "threads": N, "iters": N, "mean_ms": x, "p50_ms": x,
   "p99_ms": x, "max_abs_diff": x | null, "top5_agree": bool | null, "top5_ort": [...],
   "top5_tract": [...]}
or {"ok": false, "error": "..."} when onnxruntime/numpy are missing or the run fails, so the
caller can report a skip instead of crashing. Exit status is 0 in both cases; 2 on bad usage.

--input is the raw little-endian f32 tensor the Rust side ran (batch 1); --reference-logits
(optional) are tract's raw f32 logits for that input, to check that both engines agree.
"""

import argparse
import json
import sys
import time

MARKER = "ORT_JSON "


def emit(obj):
    print(MARKER + json.dumps(obj), flush=True)


def percentile(sorted_ms, q):
    """Nearest-rank percentile, the same definition as the Rust side."""
    if not sorted_ms:
        return float("nan")
    rank = max(1, int(-(-q * len(sorted_ms) // 100)))  # ceil(q/100 * n), at least 1
    return sorted_ms[min(rank, len(sorted_ms)) - 1]


def top5(values):
    import numpy as np

    return [int(i) for i in np.argsort(-values, kind="stable")[:5]]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--input", required=True, help="raw f32 input tensor, batch 1")
    p.add_argument("--reference-logits", help="raw f32 logits from tract for --input")
    args = p.parse_args()

    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        emit({"ok": False, "error": f"cannot import onnxruntime/numpy ({e}); "
              "pip install onnxruntime numpy"})
        return 0

    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = args.threads
        # One request at a time, like a tract session: no inter-op parallelism.
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        out_name = sess.get_outputs()[0].name
        # Symbolic dims ("batch", "N", None) become 1: the bench runs one image at a time.
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        x = np.fromfile(args.input, dtype="<f4")
        if x.size != int(np.prod(shape)):
            raise ValueError(f"input file has {x.size} floats, model input {inp.shape} "
                             f"wants {int(np.prod(shape))}")
        x = x.reshape(shape)
        feed = {inp.name: x}

        for _ in range(args.warmup):
            sess.run([out_name], feed)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            sess.run([out_name], feed)
            times.append((time.perf_counter() - t0) * 1e3)
        logits = np.asarray(sess.run([out_name], feed)[0], dtype=np.float32).reshape(-1)

        result = {
            "ok": True,
            "ort_version": ort.__version__,
            "threads": args.threads,
            "iters": args.iters,
            "mean_ms": float(np.mean(times)) if times else float("nan"),
            "p50_ms": percentile(sorted(times), 50),
            "p99_ms": percentile(sorted(times), 99),
            "finite": bool(np.isfinite(logits).all()),
            "top5_ort": top5(logits),
            "max_abs_diff": None,
            "top5_agree": None,
            "top5_tract": None,
        }
        if args.reference_logits:
            ref = np.fromfile(args.reference_logits, dtype="<f4")
            if ref.size != logits.size:
                raise ValueError(f"reference has {ref.size} logits, onnxruntime {logits.size}")
            result["max_abs_diff"] = float(np.max(np.abs(ref - logits)))
            result["top5_tract"] = top5(ref)
            result["top5_agree"] = result["top5_tract"] == result["top5_ort"]
        emit(result)
    except Exception as e:  # noqa: BLE001 - reported to the caller, which prints it loudly
        emit({"ok": False, "error": f"onnxruntime run failed: {type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())

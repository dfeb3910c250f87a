//! The cuDNN engine against PyTorch itself: `scripts/torch_peer.py export` writes torchvision's
//! ResNet-50 (random weights, seed 0) as ONNX, a seeded input and PyTorch's fp32 logits for it
//! (computed on the CPU); the engine loads that ONNX file and must reproduce the logits.
//! Skips loudly without a GPU (CUDA driver, cuDNN, cuBLAS) or without python3 with torch,
//! torchvision and onnx (every machine but the GPU one).
//!
//! Build once, run elsewhere:
//!   cargo test -p hacserve-runtime --test gpu_torch_reference --no-run   # prints the binary
//!   HACSERVE_REPO=/path/to/repo <binary> --nocapture --test-threads 1
//! HACSERVE_REPO locates scripts/torch_peer.py (default: the source checkout);
//! HACSERVE_PYTHON picks the interpreter (default: python3).

use std::path::PathBuf;
use std::process::Command;

use hacserve_runtime::engine::cudnn::{self, CudnnLoader, CudnnOptions, Precision};
use hacserve_runtime::engine::InferenceEngine;

/// max |ours - torch| / max |torch| allowed. FP32: FMA convolutions and an FP32 GEMM summing in
/// another order than PyTorch's CPU kernels, ~1e-5 expected; the whole top-5 must match in
/// order. FP16 (NHWC tensor-op convolutions, FP32 accumulation, activations rounded to 11-bit
/// mantissas after every layer): ~1e-2 expected, so only the top-1 must match (the export picks
/// an input whose top-1 leads the runner-up by a clear margin, see torch_peer.py).
const TOL_FP32: f32 = 1e-3;
const TOL_FP16: f32 = 3e-2;

const INPUT_LEN: usize = 3 * 224 * 224;
const CLASSES: usize = 1000;

fn repo_root() -> PathBuf {
    std::env::var_os("HACSERVE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

fn python() -> String {
    std::env::var("HACSERVE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Why this machine cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if let Err(e) = cudnn::available() {
        return Some(format!("no GPU engine here: {e}"));
    }
    let py = python();
    match Command::new(&py)
        .args(["-c", "import torch, torchvision, onnx"])
        .output()
    {
        Err(e) => Some(format!("cannot run {py}: {e}")),
        Ok(out) if !out.status.success() => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Some(format!(
                "{py} lacks torch/torchvision/onnx ({})",
                stderr.lines().last().unwrap_or("no error text")
            ))
        }
        Ok(_) => None,
    }
}

fn read_f32(path: &std::path::Path, want: usize) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_eq!(bytes.len(), want * 4, "{} size", path.display());
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn top5(v: &[f32]) -> Vec<usize> {
    let mut ix: Vec<usize> = (0..v.len()).collect();
    ix.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    ix.truncate(5);
    ix
}

/// max |ours - torch| / max |torch|
fn max_rel_diff(ours: &[f32], torch: &[f32]) -> f32 {
    let scale = torch.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(torch)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale.max(1e-30)
}

#[test]
fn engine_reproduces_pytorch_resnet50_logits() {
    if let Some(reason) = missing_prerequisite() {
        eprintln!("SKIPPED PyTorch reference test: {reason}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("hacserve-torch-ref-{}", std::process::id()));
    let script = repo_root().join("scripts/torch_peer.py");
    let out = Command::new(python())
        .arg(&script)
        .arg("export")
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} export failed ({}):\n{}{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    let model = dir.join("resnet50.onnx");
    let input = read_f32(&dir.join("input.f32"), INPUT_LEN);
    let want = read_f32(&dir.join("torch_logits.f32"), CLASSES);

    for (precision, cuda_graph, tol) in [
        (Precision::Fp32, false, TOL_FP32),
        (Precision::Fp16, true, TOL_FP16),
    ] {
        let loader = CudnnLoader::load_with(
            &model,
            0,
            CudnnOptions {
                batch: 1,
                precision,
                cuda_graph,
                gpu_decode: false,
                max_batch: 1,
                hardware_decode: false,
                preferred_batches: 0,
                overlap_batches: false,
            },
        )
        .unwrap_or_else(|e| panic!("loading the PyTorch export with {precision:?}: {e}"));
        let mut session = loader.cudnn_session().unwrap();
        assert_eq!(session.input_shape(), [1, 3, 224, 224]);
        assert_eq!(session.num_classes(), CLASSES);
        let mut got = vec![0f32; CLASSES];
        session.infer(&input, &mut got).unwrap();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{precision:?}: non-finite logits"
        );
        let rel = max_rel_diff(&got, &want);
        let (ours, torch) = (top5(&got), top5(&want));
        eprintln!(
            "{precision:?} on {} ({} plan steps{}): max rel diff {rel:.3e} (tolerance {tol:e}), \
             top-5 ours {ours:?} torch {torch:?}",
            loader.device_name(),
            loader.plan().steps.len(),
            if session.uses_cuda_graph() {
                ", CUDA graph"
            } else {
                ""
            }
        );
        assert!(
            rel <= tol,
            "{precision:?}: max rel diff {rel:e} above {tol:e}"
        );
        if precision == Precision::Fp16 {
            assert_eq!(ours[0], torch[0], "Fp16: top-1 differs");
        } else {
            assert_eq!(ours, torch, "{precision:?}: top-5 differ");
        }
    }
    // Best effort: a leftover temp folder is harmless.
    let _ = std::fs::remove_dir_all(&dir);
}

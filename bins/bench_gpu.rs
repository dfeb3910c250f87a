//! GPU benchmark of the cuDNN engine against PyTorch on the same ResNet-50 weights, in one
//! table: batch-1 latency (input already on the device, as PyTorch's CUDA-graph replay; and
//! the full host path), batch-32 throughput, nvJPEG decode (+ preprocessing, + the model), and
//! the agreement of the engine's FP32 and FP16 logits with PyTorch's fp32 logits; batch 128
//! against `torch.compile` (modes reduce-overhead and max-autotune, from the same run), and a
//! batch-1 profile: each layer's device time in a CUDA graph of its own next to the whole
//! graph's replay, so kernels and gaps show.
//!
//! Inputs come from `scripts/torch_peer.py` (`export` for the model, input and logits; `bench`
//! for PyTorch's figures); `scripts/bench_gpu.sh OUT_DIR` runs everything in order.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use argh::FromArgs;
use hacserve_runtime::engine::cudnn::{self, CudnnLoader, CudnnOptions, Precision};
use hacserve_runtime::engine::InferenceEngine;
use hacserve_runtime::stats::Summary;

/// Goals of the GPU issues (batch 1: issue 13 part 4; batch 128: 1.5x torch.compile's best).
const GOAL_B1_MS: f64 = 0.30;
const GOAL_B128_VS_COMPILE: f64 = 1.5;
/// Images per batch of the torch.compile throughput comparison.
const BIG_BATCH: usize = 128;
const GOAL_B32_IMG_S: f64 = 20_000.0;
const GOAL_DECODE_MS: f64 = 0.3;
/// Agreement with PyTorch's fp32 logits, max |ours - torch| / max |torch|. FP32 (FMA
/// convolutions, FP32 GEMM) sums in another order than PyTorch's CPU kernels: ~1e-5 expected.
/// FP16 rounds activations to 11-bit mantissas after every layer: ~1e-2 expected.
const TOL_FP32: f64 = 1e-3;
const TOL_FP16: f64 = 3e-2;
/// Images per batch of the throughput figures.
const BATCH: usize = 32;

/// Measure the cuDNN GPU engine (ResNet-50 FP16, CUDA graph) and nvJPEG decoding against
/// PyTorch's figures from the same run.
#[derive(FromArgs)]
struct Args {
    /// folder written by `scripts/torch_peer.py export` (resnet50.onnx, input.f32,
    /// torch_logits.f32)
    #[argh(option)]
    model_dir: PathBuf,
    /// JPEG for the decode figures (e.g. the 500x375 one of `torch_peer.py make-jpeg`)
    #[argh(option)]
    jpeg: PathBuf,
    /// the figures of `torch_peer.py bench --json` (PyTorch); without it the peer columns are empty
    #[argh(option)]
    torch_json: Option<PathBuf>,
    /// timed batch-1 runs per figure (default: 1000)
    #[argh(option, default = "1000")]
    iters: usize,
    /// timed batch-32 runs per figure (default: 200)
    #[argh(option, default = "200")]
    batch_iters: usize,
    /// timed decodes per figure (default: 500)
    #[argh(option, default = "500")]
    decode_iters: usize,
    /// untimed runs before each figure (default: 50)
    #[argh(option, default = "50")]
    warmup: usize,
    /// skip the batch-1 per-layer profile
    #[argh(switch)]
    no_profile: bool,
    /// GPU ordinal (default: 0)
    #[argh(option, default = "0")]
    device: usize,
    /// also write our figures as a flat JSON object to this file
    #[argh(option)]
    json: Option<PathBuf>,
}

/// Latency order statistics in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Lat {
    p50: f64,
    p99: f64,
    mean: f64,
}

/// Times `iters` calls of `f` after `warmup` untimed ones; each call must wait for its GPU
/// work (every engine call used here does).
fn time_calls(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Lat> {
    for _ in 0..warmup {
        f()?;
    }
    let mut ns = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    let s = Summary::of(&mut ns);
    Ok(Lat {
        p50: s.p50 as f64 / 1e6,
        p99: s.p99 as f64 / 1e6,
        mean: s.mean / 1e6,
    })
}

fn read_f32(path: &Path, want: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        bytes.len() == want * 4,
        "{} has {} bytes, want {} ({want} f32)",
        path.display(),
        bytes.len(),
        want * 4
    );
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn top5(v: &[f32]) -> Vec<usize> {
    let mut ix: Vec<usize> = (0..v.len()).collect();
    ix.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    ix.truncate(5);
    ix
}

/// max |ours - theirs| / max |theirs|.
fn max_rel_diff(ours: &[f32], theirs: &[f32]) -> f64 {
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    f64::from(diff) / f64::from(scale).max(1e-30)
}

/// Raw text of `"key": value` in a flat JSON object (numbers, bools, strings without escapes):
/// enough for torch_peer.py's output without a JSON dependency.
fn json_field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let rest = json[json.find(&pat)? + pat.len()..].trim_start();
    let end = if let Some(body) = rest.strip_prefix('"') {
        body.find('"')? + 2
    } else {
        rest.find([',', '}', '\n']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

/// PyTorch's figures, from `torch_peer.py bench --json`.
struct Torch {
    version: String,
    device: String,
    b1: Lat,
    b32_p50_ms: f64,
    b32_p99_ms: f64,
    b32_img_s: f64,
    decode: Lat,
    jpeg: String,
    /// Eager CUDA-graph batch 128, img/s.
    b128_img_s: Option<f64>,
    /// torch.compile modes: reduce-overhead and max-autotune.
    compiled: Vec<Compiled>,
}

/// One torch.compile mode's figures (absent ones: it did not get that far).
struct Compiled {
    mode: &'static str,
    status: String,
    seconds: f64,
    b1: Option<Lat>,
    b128_img_s: Option<f64>,
}

fn read_torch(path: &Path) -> Result<Torch> {
    let json =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        json_field(&json, "ok") == Some("true"),
        "{} does not report a successful run",
        path.display()
    );
    let num = |key: &str| -> Result<f64> {
        let raw =
            json_field(&json, key).with_context(|| format!("no {key} in {}", path.display()))?;
        raw.parse()
            .with_context(|| format!("{key} in {} is not a number: {raw}", path.display()))
    };
    let text = |key: &str| {
        json_field(&json, key)
            .unwrap_or("?")
            .trim_matches('"')
            .to_string()
    };
    Ok(Torch {
        version: text("torch_version"),
        device: text("device"),
        b1: Lat {
            p50: num("b1_p50_ms")?,
            p99: num("b1_p99_ms")?,
            mean: num("b1_mean_ms").unwrap_or(f64::NAN),
        },
        b32_p50_ms: num("b32_p50_ms")?,
        b32_p99_ms: num("b32_p99_ms").unwrap_or(f64::NAN),
        b32_img_s: num("b32_img_s")?,
        decode: Lat {
            p50: num("decode_p50_ms")?,
            p99: num("decode_p99_ms")?,
            mean: f64::NAN,
        },
        jpeg: format!(
            "{}x{}, {} B",
            text("jpeg_w"),
            text("jpeg_h"),
            text("jpeg_bytes")
        ),
        b128_img_s: num("b128_img_s").ok(),
        compiled: [("reduce-overhead", "ro"), ("max-autotune", "ma")]
            .into_iter()
            .filter(|(_, key)| json_field(&json, &format!("compile_{key}_status")).is_some())
            .map(|(mode, key)| {
                let f = |what: &str| num(&format!("compile_{key}_{what}")).ok();
                Compiled {
                    mode,
                    status: text(&format!("compile_{key}_status")),
                    seconds: f("seconds").unwrap_or(f64::NAN),
                    b1: f("b1_p50_ms").map(|p50| Lat {
                        p50,
                        p99: f("b1_p99_ms").unwrap_or(f64::NAN),
                        mean: f64::NAN,
                    }),
                    b128_img_s: f("b128_img_s"),
                }
            })
            .collect(),
    })
}

fn load(args: &Args, model: &Path, options: CudnnOptions) -> Result<CudnnLoader> {
    CudnnLoader::load_with(model, args.device, options).with_context(|| {
        format!(
            "loading {} on GPU {} ({:?}, batch {})",
            model.display(),
            args.device,
            options.precision,
            options.batch
        )
    })
}

fn fp16_graph(batch: usize, gpu_decode: bool) -> CudnnOptions {
    CudnnOptions {
        batch,
        precision: Precision::Fp16,
        cuda_graph: true,
        gpu_decode,
        max_batch: 1,
        hardware_decode: false,
        preferred_batches: 0,
        overlap_batches: false,
    }
}

/// Everything we measure, in ms (latencies) and img/s.
struct Ours {
    device: String,
    graphs: bool,
    b1_device: Lat,
    b1_infer: Lat,
    b1_run: Lat,
    b32_device: Lat,
    b32_infer: Lat,
    b128_device: Lat,
    profile: Option<cudnn::Profile>,
    decode: Lat,
    decode_pre: Lat,
    decode_pre_run: Lat,
    jpeg: String,
    fp16_logits: Vec<f32>,
}

fn measure(args: &Args, model: &Path, input: &[f32], jpeg: &[u8]) -> Result<Ours> {
    // Batch 1, FP16, CUDA graph.
    let loader = load(args, model, fp16_graph(1, false))?;
    let device = loader.device_name();
    let mut s = loader
        .cudnn_session()
        .context("creating the batch-1 session")?;
    let mut graphs = s.uses_cuda_graph();
    let classes = s.num_classes();
    ensure!(
        s.input_shape().iter().product::<usize>() == input.len(),
        "the model's input {:?} does not take the saved {} values",
        s.input_shape(),
        input.len()
    );
    let mut logits = vec![0f32; classes];
    s.infer(input, &mut logits).context("batch-1 inference")?;
    let fp16_logits = logits.clone();
    // run_device replays on what the last infer uploaded: the input is on the device.
    let b1_device = time_calls(args.warmup, args.iters, || {
        s.run_device().context("batch-1 run_device")
    })?;
    let b1_infer = time_calls(args.warmup, args.iters, || {
        s.infer(input, &mut logits).context("batch-1 infer")
    })?;
    let b1_run = time_calls(args.warmup, args.iters, || {
        s.run(&mut logits).context("batch-1 run")
    })?;
    let profile = if args.no_profile {
        None
    } else {
        // Back on the saved input afterwards (the profile runs on a pseudo-random one).
        let p = s.profile_layers().context("batch-1 profile")?;
        s.infer(input, &mut logits).context("batch-1 inference")?;
        Some(p)
    };
    drop(s);
    drop(loader);

    // Batch 32, same recipe.
    let loader = load(args, model, fp16_graph(BATCH, false))?;
    let mut s = loader
        .cudnn_session()
        .context("creating the batch-32 session")?;
    graphs &= s.uses_cuda_graph();
    let batch_input: Vec<f32> = input.repeat(BATCH);
    let mut batch_logits = vec![0f32; BATCH * classes];
    s.infer(&batch_input, &mut batch_logits)
        .context("batch-32 inference")?;
    ensure!(
        batch_logits.iter().all(|v| v.is_finite()),
        "batch-32 logits are not finite"
    );
    let warm = args.warmup.min(20);
    let b32_device = time_calls(warm, args.batch_iters, || {
        s.run_device().context("batch-32 run_device")
    })?;
    let b32_infer = time_calls(warm, args.batch_iters, || {
        s.infer(&batch_input, &mut batch_logits)
            .context("batch-32 infer")
    })?;
    drop(s);
    drop(loader);

    // Batch 128 (the torch.compile comparison), input on the device.
    let loader = load(args, model, fp16_graph(BIG_BATCH, false))?;
    let mut s = loader
        .cudnn_session()
        .context("creating the batch-128 session")?;
    graphs &= s.uses_cuda_graph();
    let big_input: Vec<f32> = input.repeat(BIG_BATCH);
    let mut big_logits = vec![0f32; BIG_BATCH * classes];
    s.infer(&big_input, &mut big_logits)
        .context("batch-128 inference")?;
    ensure!(
        big_logits.iter().all(|v| v.is_finite()),
        "batch-128 logits are not finite"
    );
    let b128_device = time_calls(warm.min(10), (args.batch_iters / 4).max(20), || {
        s.run_device().context("batch-128 run_device")
    })?;
    drop(s);
    drop(loader);

    // nvJPEG decode, + preprocessing, + the model, on a gpu_decode session.
    let loader = load(args, model, fp16_graph(1, true))?;
    let mut s = loader
        .cudnn_session()
        .context("creating the GPU-decode session")?;
    graphs &= s.uses_cuda_graph();
    let images = s
        .device_images()
        .ok_or_else(|| anyhow!("the gpu_decode session offers no device images"))?;
    let (w, h) = images
        .decode(jpeg)
        .with_context(|| format!("decoding {}", args.jpeg.display()))?;
    let decode = time_calls(args.warmup, args.decode_iters, || {
        images.decode(jpeg).map(drop).context("nvJPEG decode")
    })?;
    let decode_pre = time_calls(args.warmup, args.decode_iters, || {
        images.decode(jpeg).context("nvJPEG decode")?;
        images.preprocess().context("GPU preprocessing")
    })?;
    let decode_pre_run = time_calls(args.warmup, args.decode_iters, || {
        images.decode(jpeg).context("nvJPEG decode")?;
        images.preprocess().context("GPU preprocessing")?;
        images
            .run_preprocessed(&mut logits)
            .context("run on the preprocessed input")
    })?;
    Ok(Ours {
        device,
        graphs,
        b1_device,
        b1_infer,
        b1_run,
        b32_device,
        b32_infer,
        b128_device,
        profile,
        decode,
        decode_pre,
        decode_pre_run,
        jpeg: format!("{w}x{h}, {} B", jpeg.len()),
        fp16_logits,
    })
}

/// One agreement check against PyTorch's fp32 logits.
struct Agreement {
    label: &'static str,
    rel: f64,
    tol: f64,
    top5_ours: Vec<usize>,
    top5_torch: Vec<usize>,
    /// FP32: the whole top-5 in order; FP16: the top-1.
    strict_top5: bool,
}

impl Agreement {
    fn new(label: &'static str, ours: &[f32], torch: &[f32], tol: f64, strict: bool) -> Self {
        Agreement {
            label,
            rel: max_rel_diff(ours, torch),
            tol,
            top5_ours: top5(ours),
            top5_torch: top5(torch),
            strict_top5: strict,
        }
    }

    fn ok(&self) -> bool {
        let order = if self.strict_top5 {
            self.top5_ours == self.top5_torch
        } else {
            self.top5_ours.first() == self.top5_torch.first()
        };
        self.rel <= self.tol && order
    }

    fn line(&self) -> String {
        format!(
            "{:<6} max rel diff {:.3e} (tolerance {:.0e}), top-5 ours {:?} torch {:?}: \
             top-5 {}, top-1 {} -> {}",
            self.label,
            self.rel,
            self.tol,
            self.top5_ours,
            self.top5_torch,
            if self.top5_ours == self.top5_torch {
                "equal"
            } else {
                "DIFFER"
            },
            if self.top5_ours.first() == self.top5_torch.first() {
                "equal"
            } else {
                "DIFFERS"
            },
            if self.ok() { "ok" } else { "MISMATCH" }
        )
    }
}

fn ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "-".to_string()
    }
}

fn goal(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// torch.compile's figures next to ours, and the part-4 goals.
fn compile_table(t: Option<&Torch>, ours: &Ours, b128_device: f64) -> Vec<String> {
    let mut out = vec![format!(
        "torch.compile peers (same run, fp16 channels_last, static shapes; each mode in its own \
         capped process):"
    )];
    out.push(format!(
        " {:<22} {:<28} {:>9} {:>10} {:>10} {:>12}",
        "engine", "status", "compile s", "b1 p50 ms", "b1 p99 ms", "b128 img/s"
    ));
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    out.push(format!(
        " {:<22} {:<28} {:>9} {:>10} {:>10} {:>12.0}",
        "ours (cuDNN, graph)",
        "",
        "",
        ms(ours.b1_device.p50),
        ms(ours.b1_device.p99),
        b128_device
    ));
    let Some(t) = t else {
        out.push(" (no PyTorch figures)".into());
        return out;
    };
    out.push(format!(
        " {:<22} {:<28} {:>9} {:>10} {:>10} {:>12}",
        "torch eager CUDA graph",
        "",
        "",
        ms(t.b1.p50),
        ms(t.b1.p99),
        opt(t.b128_img_s, 0)
    ));
    for c in &t.compiled {
        out.push(format!(
            " {:<22} {:<28} {:>9.0} {:>10} {:>10} {:>12}",
            format!("compile {}", c.mode),
            c.status,
            c.seconds,
            c.b1.map_or("-".into(), |l| ms(l.p50)),
            c.b1.map_or("-".into(), |l| ms(l.p99)),
            opt(c.b128_img_s, 0)
        ));
    }
    let best_b1 = t
        .compiled
        .iter()
        .filter_map(|c| c.b1.map(|l| (l.p50, c.mode)))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    let best_b128 = t
        .compiled
        .iter()
        .filter_map(|c| c.b128_img_s.map(|v| (v, c.mode)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    out.push("goals (issue 13, part 4):".into());
    out.push(format!(
        " batch 1 fp16, input on device: ours p50 {} ms{} (goal <= {GOAL_B1_MS:.2} ms): {}",
        ms(ours.b1_device.p50),
        best_b1.map_or(String::new(), |(v, m)| format!(
            ", torch.compile's best {} ms ({m}), {:.2}x faster",
            ms(v),
            v / ours.b1_device.p50
        )),
        goal(ours.b1_device.p50 <= GOAL_B1_MS)
    ));
    match best_b128 {
        Some((v, m)) => out.push(format!(
            " batch 128 img/s: ours {b128_device:.0}, torch.compile's best {v:.0} ({m}): {:.2}x \
             (goal >= {GOAL_B128_VS_COMPILE:.1}x): {}",
            b128_device / v,
            goal(b128_device >= GOAL_B128_VS_COMPILE * v)
        )),
        None => out.push(format!(
            " batch 128 img/s: ours {b128_device:.0}; no torch.compile batch-128 figure (see \
             the status column): goal not checked"
        )),
    }
    out
}

/// The batch-1 profile: layers, the sum, and the whole graph.
fn profile_table(p: &cudnn::Profile, b1: Lat) -> Vec<String> {
    let mut out =
        vec![
        "batch-1 profile: each layer alone in a CUDA graph of 10 runs (mean device time per run, \
         CUDA events; pseudo-random input), vs the whole graph's replay:"
            .to_string(),
        format!(" {:>3} {:<64} {:>7} {:>5} {:>8}", "#", "layer", "kernels", "other", "us"),
    ];
    for (i, l) in p.layers.iter().enumerate() {
        out.push(format!(
            " {:>3} {:<64} {:>7} {:>5} {:>8.2}",
            i, l.layer, l.kernels, l.other_nodes, l.us
        ));
    }
    let sum: f64 = p.layers.iter().map(|l| l.us).sum();
    let kernels: usize = p.layers.iter().map(|l| l.kernels).sum();
    let mut by_kind: Vec<(String, usize, f64)> = Vec::new();
    for l in &p.layers {
        let kind = l.layer.split([' ', '(']).next().unwrap_or("?").to_string();
        match by_kind.iter_mut().find(|(k, _, _)| *k == kind) {
            Some(e) => {
                e.1 += 1;
                e.2 += l.us;
            }
            None => by_kind.push((kind, 1, l.us)),
        }
    }
    out.push(format!(
        " by kind: {}",
        by_kind
            .iter()
            .map(|(k, n, us)| format!("{k} x{n} {us:.1} us"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    match p.graph_us {
        Some(g) => out.push(format!(
            " sum of the layers {sum:.1} us ({kernels} kernels); whole graph replay {g:.1} us on \
             the device ({} kernel + {} other nodes), {:.1} us host-timed p50: between the layers \
             (gaps, cold caches) {:.1} us, host wait and launch {:.1} us",
            p.graph_kernels,
            p.graph_other_nodes,
            b1.p50 * 1e3,
            g - sum,
            b1.p50 * 1e3 - g
        )),
        None => out.push(format!(
            " sum of the layers {sum:.1} us ({kernels} kernels); no CUDA graph to compare"
        )),
    }
    out
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    // The engine's start-up lines (the measured conv-algorithm choice) on stderr.
    hacserve_runtime::logging::init(false);
    ensure!(
        args.iters > 0 && args.batch_iters > 0 && args.decode_iters > 0,
        "iteration counts must be at least 1"
    );
    cudnn::available().map_err(|e| anyhow!("no usable GPU here: {e}"))?;
    let model = args.model_dir.join("resnet50.onnx");
    ensure!(
        model.is_file(),
        "{} not found (write it with: python3 scripts/torch_peer.py export --out {})",
        model.display(),
        args.model_dir.display()
    );
    let input = read_f32(&args.model_dir.join("input.f32"), 3 * 224 * 224)?;
    let torch_logits = read_f32(&args.model_dir.join("torch_logits.f32"), 1000)?;
    let jpeg = std::fs::read(&args.jpeg)
        .with_context(|| format!("reading the JPEG {}", args.jpeg.display()))?;
    // A missing or broken peer file is reported, not fatal: our figures still print.
    let (torch, torch_note) = match &args.torch_json {
        Some(path) => match read_torch(path) {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
        None => (None, Some("no --torch-json given".to_string())),
    };

    // Correctness first (part 4): FP32 without a graph, the saved input, PyTorch's logits.
    let fp32 = {
        let loader = load(
            &args,
            &model,
            CudnnOptions {
                batch: 1,
                precision: Precision::Fp32,
                cuda_graph: false,
                gpu_decode: false,
                max_batch: 1,
                hardware_decode: false,
                preferred_batches: 0,
                overlap_batches: false,
            },
        )?;
        let mut s = loader
            .cudnn_session()
            .context("creating the FP32 session")?;
        let mut logits = vec![0f32; s.num_classes()];
        ensure!(
            logits.len() == torch_logits.len(),
            "the model has {} classes, PyTorch's logits {}",
            logits.len(),
            torch_logits.len()
        );
        s.infer(&input, &mut logits).context("FP32 inference")?;
        logits
    };
    let ours = measure(&args, &model, &input, &jpeg)?;
    let finite = fp32.iter().chain(&ours.fp16_logits).all(|v| v.is_finite());
    let checks = [
        Agreement::new("FP32", &fp32, &torch_logits, TOL_FP32, true),
        Agreement::new("FP16", &ours.fp16_logits, &torch_logits, TOL_FP16, false),
    ];

    let b32_device = BATCH as f64 / (ours.b32_device.p50 / 1e3);
    let b32_infer = BATCH as f64 / (ours.b32_infer.p50 / 1e3);
    let line = |s: String| println!("{s}");
    line(format!(
        "bench_gpu: ResNet-50 from {} on {} ({}); PyTorch: {}",
        args.model_dir.display(),
        ours.device,
        if ours.graphs {
            "FP16 NHWC, CUDA graphs"
        } else {
            "FP16 NHWC, a CUDA graph capture FAILED: eager launches in some figures"
        },
        match &torch {
            Some(t) => format!("{} on {}", t.version, t.device),
            None => format!("none ({})", torch_note.as_deref().unwrap_or("?")),
        }
    ));
    line(format!(
        "batch 1: {} timed runs, batch {BATCH}: {}, decode: {} ({}), each after up to {} warm-up",
        args.iters, args.batch_iters, args.decode_iters, ours.jpeg, args.warmup
    ));
    line(String::new());
    line(format!(
        "{:<48} {:>10} {:>10} {:>10} {:>10} {:>9}  {:<16} {}",
        "figure", "ours p50", "ours p99", "torch p50", "torch p99", "vs torch", "goal", "goal met"
    ));
    let t = torch.as_ref();
    // "vs torch": how many times faster we are (> 1 = faster), for latencies and rates alike.
    let faster = |ours: f64, theirs: Option<f64>| match theirs {
        Some(v) if v.is_finite() && ours > 0.0 => format!("{:.2}x", v / ours),
        _ => "-".to_string(),
    };
    let row = |name: &str, o: Lat, tp: Option<Lat>, goal_text: &str, met: Option<bool>| {
        format!(
            "{:<48} {:>10} {:>10} {:>10} {:>10} {:>9}  {:<16} {}",
            name,
            ms(o.p50),
            ms(o.p99),
            tp.map_or("-".into(), |l| ms(l.p50)),
            tp.map_or("-".into(), |l| ms(l.p99)),
            faster(o.p50, tp.map(|l| l.p50)),
            goal_text,
            met.map_or("", goal)
        )
    };
    line(row(
        "b1 latency ms, input on device (run_device)",
        ours.b1_device,
        t.map(|t| t.b1),
        "<= 0.30 ms",
        Some(ours.b1_device.p50 <= GOAL_B1_MS),
    ));
    line(row(
        "b1 latency ms, host path infer() (copy+up+down)",
        ours.b1_infer,
        None,
        "",
        None,
    ));
    line(row(
        "b1 latency ms, host path run() (pinned up+down)",
        ours.b1_run,
        None,
        "",
        None,
    ));
    line(row(
        "b32 batch ms, input on device (run_device)",
        ours.b32_device,
        t.map(|t| Lat {
            p50: t.b32_p50_ms,
            p99: t.b32_p99_ms,
            mean: f64::NAN,
        }),
        "",
        None,
    ));
    line(row(
        "b32 batch ms, host path infer() (upload incl.)",
        ours.b32_infer,
        None,
        "",
        None,
    ));
    let rate = |name: &str, ours: f64, theirs: Option<f64>, with_goal: bool| {
        format!(
            "{:<48} {:>10.0} {:>10} {:>10} {:>10} {:>9}  {:<16} {}",
            name,
            ours,
            "",
            theirs.map_or("-".into(), |v| format!("{v:.0}")),
            "",
            match theirs {
                Some(v) if v > 0.0 => format!("{:.2}x", ours / v),
                _ => "-".to_string(),
            },
            if with_goal { ">= 20,000 img/s" } else { "" },
            if with_goal {
                goal(ours >= GOAL_B32_IMG_S)
            } else {
                ""
            }
        )
    };
    line(rate(
        "b32 img/s (p50), input on device",
        b32_device,
        t.map(|t| t.b32_img_s),
        true,
    ));
    line(rate(
        "b32 img/s (p50), host path infer()",
        b32_infer,
        None,
        false,
    ));
    line(row(
        "JPEG decode ms (nvJPEG; torch: decode_jpeg cuda)",
        ours.decode,
        t.map(|t| t.decode),
        "<= 0.3 ms",
        Some(ours.decode.p50 <= GOAL_DECODE_MS),
    ));
    line(row(
        "JPEG decode + preprocess ms",
        ours.decode_pre,
        None,
        "",
        None,
    ));
    line(row(
        "JPEG decode + preprocess + b1 run ms (on device)",
        ours.decode_pre_run,
        None,
        "",
        None,
    ));
    let b128_device = BIG_BATCH as f64 / (ours.b128_device.p50 / 1e3);
    line(rate(
        "b128 img/s (p50), input on device",
        b128_device,
        t.and_then(|t| t.b128_img_s),
        false,
    ));
    line(String::new());
    compile_table(t, &ours, b128_device)
        .into_iter()
        .for_each(line);
    if let Some(p) = &ours.profile {
        line(String::new());
        profile_table(p, ours.b1_device).into_iter().for_each(line);
    }
    line(String::new());
    if let Some(t) = t {
        if t.jpeg != ours.jpeg {
            line(format!(
                "NOTE: PyTorch decoded a {} JPEG, we decoded {}",
                t.jpeg, ours.jpeg
            ));
        }
    }
    line(format!(
        "means (ms): b1 device {:.3}, b1 infer {:.3}, b32 device {:.3}, decode {:.3}{}",
        ours.b1_device.mean,
        ours.b1_infer.mean,
        ours.b32_device.mean,
        ours.decode.mean,
        t.map_or(String::new(), |t| format!("; torch b1 {}", ms(t.b1.mean)))
    ));
    line("correctness vs PyTorch fp32 logits (CPU), same input:".to_string());
    for c in &checks {
        line(format!("  {}", c.line()));
    }
    if let Some(note) = &torch_note {
        line(format!("!!!!!!!! no PyTorch figures: {note} !!!!!!!!"));
    }

    if let Some(path) = &args.json {
        let json = format!(
            "{{\"ok\": true, \"device\": {:?}, \"cuda_graphs\": {}, \
             \"b1_device_p50_ms\": {:.6}, \"b1_device_p99_ms\": {:.6}, \
             \"b1_infer_p50_ms\": {:.6}, \"b1_infer_p99_ms\": {:.6}, \
             \"b1_run_p50_ms\": {:.6}, \"b1_run_p99_ms\": {:.6}, \
             \"b32_device_p50_ms\": {:.6}, \"b32_device_img_s\": {:.1}, \
             \"b32_infer_p50_ms\": {:.6}, \"b32_infer_img_s\": {:.1}, \
             \"b128_device_p50_ms\": {:.6}, \"b128_device_img_s\": {:.1}, \
             \"decode_p50_ms\": {:.6}, \"decode_p99_ms\": {:.6}, \
             \"decode_preprocess_p50_ms\": {:.6}, \"decode_preprocess_run_p50_ms\": {:.6}, \
             \"fp32_max_rel_diff\": {:.6e}, \"fp32_ok\": {}, \
             \"fp16_max_rel_diff\": {:.6e}, \"fp16_ok\": {}}}\n",
            ours.device,
            ours.graphs,
            ours.b1_device.p50,
            ours.b1_device.p99,
            ours.b1_infer.p50,
            ours.b1_infer.p99,
            ours.b1_run.p50,
            ours.b1_run.p99,
            ours.b32_device.p50,
            b32_device,
            ours.b32_infer.p50,
            b32_infer,
            ours.b128_device.p50,
            b128_device,
            ours.decode.p50,
            ours.decode.p99,
            ours.decode_pre.p50,
            ours.decode_pre_run.p50,
            checks[0].rel,
            checks[0].ok(),
            checks[1].rel,
            checks[1].ok()
        );
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }

    if !finite {
        bail!("the engine produced non-finite logits");
    }
    if let Some(bad) = checks.iter().find(|c| !c.ok()) {
        bail!(
            "{} logits disagree with PyTorch beyond the tolerance (see above)",
            bad.label
        );
    }
    Ok(())
}

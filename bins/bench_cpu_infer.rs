//! Per-image CPU inference latency of the tract backend, side by side with onnxruntime on the same
//! model file and the same input (through scripts/ort_bench.py), plus an agreement check of the
//! two engines' logits.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use argh::FromArgs;
use hacserve_runtime::engine::tract_cpu::TractLoader;
use hacserve_runtime::engine::EngineLoader;
use hacserve_runtime::model_gen;

/// Measure tract CPU inference latency (batch 1) against onnxruntime.
#[derive(FromArgs)]
struct Args {
    /// ONNX model to run (e.g. models/resnet50.onnx from gen_models)
    #[argh(option)]
    model: PathBuf,
    /// timed iterations per configuration (default: 30)
    #[argh(option, default = "30")]
    iters: usize,
    /// untimed warm-up iterations (default: 5)
    #[argh(option, default = "5")]
    warmup: usize,
    /// intra-op threads of the multi-threaded runs (default: number of cores)
    #[argh(option)]
    threads: Option<usize>,
    /// python interpreter for the onnxruntime peer (default: python3)
    #[argh(option, default = "String::from(\"python3\")")]
    python: String,
    /// onnxruntime peer script (default: scripts/ort_bench.py)
    #[argh(option, default = "PathBuf::from(\"scripts/ort_bench.py\")")]
    ort_script: PathBuf,
    /// skip the onnxruntime peer
    #[argh(switch)]
    no_ort: bool,
    /// also print where tract spends its time, per op kind and per node
    #[argh(switch)]
    profile: bool,
}

/// Latency summary of one configuration, in milliseconds.
struct Stats {
    mean: f64,
    p50: f64,
    p99: f64,
}

impl Stats {
    fn from_samples(samples: &[Duration]) -> Stats {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
        Stats {
            mean,
            p50: percentile(&ms, 50.0),
            p99: percentile(&ms, 99.0),
        }
    }
}

/// Nearest-rank percentile of sorted values (the same definition as ort_bench.py).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

struct TractRun {
    threads: usize,
    load: Duration,
    plan_nodes: usize,
    stats: Stats,
    logits: Vec<f32>,
}

fn bench_tract(args: &Args, threads: usize, input: &[f32]) -> Result<TractRun> {
    let start = Instant::now();
    let loader = TractLoader::load(&args.model, threads)
        .with_context(|| format!("loading {} into tract", args.model.display()))?;
    let load = start.elapsed();
    let mut session = loader.session().context("creating a tract session")?;
    let mut logits = vec![0f32; session.num_classes()];
    for _ in 0..args.warmup {
        session.infer(input, &mut logits).context("tract warm-up")?;
    }
    let mut samples = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        let t = Instant::now();
        session
            .infer(input, &mut logits)
            .context("tract inference")?;
        samples.push(t.elapsed());
    }
    session
        .infer(input, &mut logits)
        .context("tract inference")?;
    if args.profile {
        print_profile(&loader, input)?;
    }
    Ok(TractRun {
        threads,
        load,
        plan_nodes: loader.plan_nodes(),
        stats: Stats::from_samples(&samples),
        logits,
    })
}

fn print_profile(loader: &TractLoader, input: &[f32]) -> Result<()> {
    let runs = 5;
    let nodes = loader
        .profile_nodes(input, runs)
        .context("profiling tract")?;
    let total: Duration = nodes.iter().map(|n| n.mean).sum();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let gflops = |macs: u64, d: Duration| 2.0 * macs as f64 / d.as_secs_f64().max(1e-12) / 1e9;
    println!(
        "tract profile, {} thread(s), mean of {runs} runs: {:.2} ms in nodes",
        loader.threads(),
        ms(total)
    );
    // Per op kind first (where the time goes), then the heaviest nodes (why).
    let mut by_op: Vec<(String, usize, Duration, u64)> = Vec::new();
    for n in &nodes {
        match by_op.iter_mut().find(|(op, ..)| *op == n.op) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 += n.mean;
                entry.3 += n.macs;
            }
            None => by_op.push((n.op.clone(), 1, n.mean, n.macs)),
        }
    }
    by_op.sort_by_key(|entry| std::cmp::Reverse(entry.2));
    for (op, count, time, macs) in by_op.iter().take(10) {
        let rate = if *macs > 0 {
            format!("{:6.1} GFLOP/s", gflops(*macs, *time))
        } else {
            String::new()
        };
        println!(
            "  {op:<22} {count:>4} nodes {:>8.2} ms {:>5.1}% {rate}",
            ms(*time),
            100.0 * time.as_secs_f64() / total.as_secs_f64().max(1e-12)
        );
    }
    println!("  heaviest nodes:");
    for n in nodes.iter().take(12) {
        println!(
            "  {:>8.2} ms {:6.1} GFLOP/s  {}  {}",
            ms(n.mean),
            gflops(n.macs, n.mean),
            n.node,
            n.detail
        );
    }
    Ok(())
}

/// What ort_bench.py reported, read from its single `ORT_JSON {...}` line.
struct OrtRun {
    version: String,
    threads: usize,
    stats: Stats,
    max_abs_diff: Option<f64>,
    top5_agree: Option<bool>,
    top5_ort: String,
    top5_tract: String,
}

/// Raw text of `"key": <value>` in a flat JSON object (numbers, bools, strings, int arrays):
/// enough for ort_bench.py's fixed output without a JSON dependency.
fn json_field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let rest = json[json.find(&pat)? + pat.len()..].trim_start();
    let end = if rest.starts_with('[') {
        rest.find(']')? + 1
    } else if let Some(body) = rest.strip_prefix('"') {
        body.find('"')? + 2
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

fn json_f64(json: &str, key: &str) -> Result<f64> {
    let raw = json_field(json, key).with_context(|| format!("no {key} in {json}"))?;
    raw.parse()
        .with_context(|| format!("{key} is not a number: {raw}"))
}

fn run_ort(
    args: &Args,
    threads: usize,
    input_file: &Path,
    logits_file: &Path,
) -> Result<OrtRun, String> {
    let out = Command::new(&args.python)
        .arg(&args.ort_script)
        .arg("--model")
        .arg(&args.model)
        .args(["--iters", &args.iters.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--threads", &threads.to_string()])
        .arg("--input")
        .arg(input_file)
        .arg("--reference-logits")
        .arg(logits_file)
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} {}: {e}",
                args.python,
                args.ort_script.display()
            )
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(json) = stdout.lines().find_map(|l| l.strip_prefix("ORT_JSON ")) else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        return Err(format!(
            "{} exited with {} and no result line ({tail})",
            args.ort_script.display(),
            out.status
        ));
    };
    if json_field(json, "ok") != Some("true") {
        let reason = json_field(json, "error").unwrap_or("unknown error");
        return Err(reason.trim_matches('"').to_string());
    }
    let parse = || -> Result<OrtRun> {
        Ok(OrtRun {
            version: json_field(json, "ort_version")
                .unwrap_or("?")
                .trim_matches('"')
                .to_string(),
            threads: json_f64(json, "threads")? as usize,
            stats: Stats {
                mean: json_f64(json, "mean_ms")?,
                p50: json_f64(json, "p50_ms")?,
                p99: json_f64(json, "p99_ms")?,
            },
            max_abs_diff: json_f64(json, "max_abs_diff").ok(),
            top5_agree: json_field(json, "top5_agree").and_then(|v| v.parse().ok()),
            top5_ort: json_field(json, "top5_ort").unwrap_or("?").to_string(),
            top5_tract: json_field(json, "top5_tract").unwrap_or("?").to_string(),
        })
    };
    parse().map_err(|e| format!("bad result line from {}: {e:#}", args.ort_script.display()))
}

fn write_f32(path: &Path, values: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    if !args.model.is_file() {
        bail!(
            "model {} not found (generate it with: gen_models --out-dir models)",
            args.model.display()
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads_n = args.threads.unwrap_or(cores).max(1);
    let mut thread_counts = vec![1];
    if threads_n > 1 {
        thread_counts.push(threads_n);
    }

    let input = model_gen::synthetic_input(1);
    println!(
        "bench_cpu_infer: model {}, batch 1, {} iters after {} warm-up, {} cores",
        args.model.display(),
        args.iters,
        args.warmup,
        cores
    );

    let mut tract_runs = Vec::new();
    for &threads in &thread_counts {
        let run = bench_tract(&args, threads, &input)?;
        println!(
            "  tract threads={threads}: loaded+optimised in {:.2} s ({} plan nodes), mean {:.2} ms",
            run.load.as_secs_f64(),
            run.plan_nodes,
            run.stats.mean
        );
        tract_runs.push(run);
    }
    if let [one, many] = tract_runs.as_slice() {
        let diff = one
            .logits
            .iter()
            .zip(&many.logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!(
            "  tract 1 vs {} threads: max |logit diff| {diff:.3e}",
            many.threads
        );
    }
    let finite = tract_runs
        .iter()
        .all(|r| r.logits.iter().all(|v| v.is_finite()));

    // The peer reads the very input tract ran and tract's logits, from files next to each other.
    let tmp = std::env::temp_dir().join(format!("hacserve-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let input_file = tmp.join("input.f32");
    let logits_file = tmp.join("tract_logits.f32");
    write_f32(&input_file, &input)?;
    let reference = tract_runs
        .last()
        .map(|r| r.logits.as_slice())
        .unwrap_or(&[]);
    write_f32(&logits_file, reference)?;

    let mut ort_runs = Vec::new();
    let mut skipped = None;
    if args.no_ort {
        skipped = Some("--no-ort given".to_string());
    } else {
        for &threads in &thread_counts {
            match run_ort(&args, threads, &input_file, &logits_file) {
                Ok(run) => ort_runs.push(run),
                Err(reason) => {
                    skipped = Some(reason);
                    break;
                }
            }
        }
    }
    // Best effort: a leftover temp file is harmless.
    let _ = std::fs::remove_dir_all(&tmp);

    println!();
    println!(
        "{:<22} {:>7} {:>9} {:>9} {:>9} {:>14}",
        "engine", "threads", "mean ms", "p50 ms", "p99 ms", "tract/ort mean"
    );
    for run in &tract_runs {
        let ratio = ort_runs
            .iter()
            .find(|o| o.threads == run.threads)
            .map(|o| format!("{:.2}", run.stats.mean / o.stats.mean))
            .unwrap_or_else(|| "-".to_string());
        println!(
            "{:<22} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>14}",
            "tract-cpu", run.threads, run.stats.mean, run.stats.p50, run.stats.p99, ratio
        );
    }
    for run in &ort_runs {
        println!(
            "{:<22} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>14}",
            format!("onnxruntime {}", run.version),
            run.threads,
            run.stats.mean,
            run.stats.p50,
            run.stats.p99,
            "1.00"
        );
    }
    println!();
    println!("tract logits finite: {finite}");
    if let Some(reason) = &skipped {
        println!("!!!!!!!! SKIPPED onnxruntime peer: {reason} !!!!!!!!");
    }
    if let (Some(ort), Some(tract)) = (ort_runs.last(), tract_runs.last()) {
        let ratio = tract.stats.mean / ort.stats.mean;
        println!(
            "ratio tract/onnxruntime at {} threads (mean): {ratio:.2} (goal <= 1.5: {})",
            tract.threads,
            if ratio <= 1.5 { "met" } else { "NOT met" }
        );
        match (ort.max_abs_diff, ort.top5_agree) {
            (Some(diff), Some(agree)) => println!(
                "agreement tract vs onnxruntime: max |logit diff| {diff:.3e}, top-5 agree: {} \
                 (tract {}, onnxruntime {})",
                if agree { "yes" } else { "NO" },
                ort.top5_tract,
                ort.top5_ort
            ),
            _ => println!("agreement tract vs onnxruntime: not reported"),
        }
    }
    if !finite {
        bail!("tract produced non-finite logits");
    }
    Ok(())
}

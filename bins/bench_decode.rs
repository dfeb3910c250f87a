//! JPEG decode on the GPU machine, by path, in one run: nvJPEG's hardware backend (batched
//! API, NVJPG engines) vs its hybrid backend (CPU Huffman, one image per call) vs the CPU
//! decoder (zune-jpeg), for each JPEG given (scripts/bench_gpu.sh generates the 500x375
//! test JPEG, a 1080p and a 12 MP one). Per path and image:
//! * latency: one image per call, `threads` = 1 (the 1-client case), p50/p99 ms;
//! * throughput: images/s of `threads` worker threads, each with its own engine session (as
//!   zmq_server's workers), each call a batch of `batch` copies of the image
//!   (`DeviceImages::stage_batch`, also for a batch of 1).
//!
//! The GPU paths are timed through the server's own stages (`DeviceImages::decode` for one
//! image, `DeviceImages::stage_batch` for a batch: decode + the preprocessing kernel into the
//! batch input, as a worker does), so the figures are what the server gets. The CPU path
//! decodes only (the CPU preprocessing is not part of the comparison).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use argh::FromArgs;
use hacserve_runtime::engine::cudnn::{CudnnLoader, CudnnOptions, Precision};
use hacserve_runtime::engine::{EngineLoader, InferenceEngine, SlotStage};
use hacserve_runtime::preprocess::{Preprocessor, MAX_IMAGE_PIXELS};
use hacserve_runtime::stats::Summary;

/// Decode figures: nvJPEG hardware vs hybrid vs CPU, latency and throughput.
#[derive(FromArgs)]
struct Args {
    /// ONNX model the GPU sessions load (any ResNet-like; only its decode stages are timed)
    #[argh(option)]
    engine_file: PathBuf,
    /// JPEG files to decode (comma-separated)
    #[argh(option)]
    jpegs: String,
    /// batch sizes of the throughput figures (comma-separated; default 1,8,32)
    #[argh(option, default = "String::from(\"1,8,32\")")]
    batches: String,
    /// worker threads of the throughput figures (comma-separated; default 1,16)
    #[argh(option, default = "String::from(\"1,16\")")]
    threads: String,
    /// seconds per throughput figure (default 1.5)
    #[argh(option, default = "1.5")]
    seconds: f64,
    /// timed single-image decodes per latency figure (default 300)
    #[argh(option, default = "300")]
    iters: usize,
    /// GPU ordinal (default 0)
    #[argh(option, default = "0")]
    device: usize,
    /// write the figures as JSON lines to this file
    #[argh(option)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Hardware,
    Hybrid,
    Cpu,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Hardware => "hardware",
            Path::Hybrid => "hybrid",
            Path::Cpu => "cpu",
        }
    }
}

fn list(text: &str, what: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| anyhow!("bad {what} {v:?} in {text:?}"))
        })
        .collect()
}

fn loader(args: &Args, path: Path, batch: usize) -> Result<CudnnLoader> {
    let options = CudnnOptions {
        batch: 1,
        precision: Precision::Fp16,
        cuda_graph: true,
        gpu_decode: true,
        max_batch: batch.max(2),
        hardware_decode: path == Path::Hardware,
        preferred_batches: 0,
        overlap_batches: false,
    };
    CudnnLoader::load_with(&args.engine_file, args.device, options).with_context(|| {
        format!(
            "loading {} for {} decode",
            args.engine_file.display(),
            path.name()
        )
    })
}

/// One worker's decode loop: `batch` copies of `jpeg` per call until `stop`; counts images.
fn worker(
    session: Option<&mut dyn InferenceEngine>,
    cpu: &mut Preprocessor,
    path: Path,
    jpeg: &[u8],
    batch: usize,
    stop: &AtomicBool,
    images: &AtomicU64,
) -> Result<()> {
    let jpegs: Vec<&[u8]> = vec![jpeg; batch];
    let mut stages = Vec::with_capacity(batch);
    let mut device = match session {
        Some(s) => Some(
            s.device_images()
                .ok_or_else(|| anyhow!("session without device images"))?,
        ),
        None => None,
    };
    while !stop.load(Ordering::Relaxed) {
        match (path, device.as_mut()) {
            (Path::Cpu, _) | (_, None) => {
                cpu.decode(jpeg).map_err(|e| anyhow!("CPU decode: {e}"))?;
                images.fetch_add(1, Ordering::Relaxed);
            }
            (_, Some(device)) => {
                device.stage_batch(&jpegs, &mut stages);
                if let Some(bad) = stages
                    .iter()
                    .find(|s| !matches!(s, SlotStage::Staged { .. }))
                {
                    bail!("batch decode: {bad:?}");
                }
                images.fetch_add(batch as u64, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

struct Figure {
    image: String,
    path: Path,
    batch: usize,
    threads: usize,
    images_s: f64,
    /// hardware share: images the hardware backend decoded / all decoded, in this figure
    hardware_share: Option<f64>,
}

fn throughput(
    args: &Args,
    loader: Option<&CudnnLoader>,
    path: Path,
    jpeg: &[u8],
    batch: usize,
    threads: usize,
) -> Result<(f64, Option<f64>)> {
    let mut sessions = Vec::new();
    for _ in 0..threads {
        sessions.push(match loader {
            Some(l) => Some(l.session().map_err(|e| anyhow!("session: {e}"))?),
            None => None,
        });
    }
    let stop = AtomicBool::new(false);
    let images = AtomicU64::new(0);
    let before: u64 = sessions
        .iter_mut()
        .filter_map(|s| s.as_mut()?.device_images()?.decode_counts())
        .map(|c| c.hardware)
        .sum();
    let started = Instant::now();
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sessions
            .iter_mut()
            .map(|s| {
                let (stop, images) = (&stop, &images);
                scope.spawn(move || {
                    let mut cpu = Preprocessor::new(MAX_IMAGE_PIXELS);
                    let session = s.as_mut().map(|b| &mut **b as &mut dyn InferenceEngine);
                    worker(session, &mut cpu, path, jpeg, batch, stop, images)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(args.seconds));
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("decode thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    for r in results {
        r?;
    }
    let decoded = images.load(Ordering::Relaxed);
    let after: u64 = sessions
        .iter_mut()
        .filter_map(|s| s.as_mut()?.device_images()?.decode_counts())
        .map(|c| c.hardware)
        .sum();
    let share =
        (path != Path::Cpu && decoded > 0).then(|| (after - before) as f64 / decoded as f64);
    Ok((decoded as f64 / elapsed, share))
}

fn latency(args: &Args, loader: Option<&CudnnLoader>, jpeg: &[u8]) -> Result<Summary> {
    let mut cpu = Preprocessor::new(MAX_IMAGE_PIXELS);
    let mut session = match loader {
        Some(l) => Some(l.session().map_err(|e| anyhow!("session: {e}"))?),
        None => None,
    };
    let mut one = || -> Result<()> {
        match session.as_mut() {
            None => cpu
                .decode(jpeg)
                .map(drop)
                .map_err(|e| anyhow!("CPU decode: {e}")),
            Some(s) => s
                .device_images()
                .ok_or_else(|| anyhow!("session without device images"))?
                .decode(jpeg)
                .map(drop)
                .map_err(|e| anyhow!("decode: {e}")),
        }
    };
    for _ in 0..20 {
        one()?;
    }
    let mut ns = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        let t = Instant::now();
        one()?;
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    Ok(Summary::of(&mut ns))
}

fn main() -> Result<()> {
    let args: Args = argh::from_env();
    // The decoder's own lines (nvJPEG's engines, decode buffer growth) belong with the figures.
    hacserve_runtime::logging::init(false);
    let batches = list(&args.batches, "batch")?;
    let threads = list(&args.threads, "thread count")?;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let images: Vec<(String, Vec<u8>)> = args
        .jpegs
        .split(',')
        .map(|p| {
            let bytes = std::fs::read(p).with_context(|| format!("reading {p}"))?;
            let (w, h) = hacserve_runtime::preprocess::jpeg_dimensions(&bytes)
                .ok_or_else(|| anyhow!("{p}: no JPEG frame header"))?;
            let name = std::path::Path::new(p)
                .file_name()
                .map_or_else(|| p.to_string(), |n| n.to_string_lossy().into_owned());
            Ok((format!("{name} {w}x{h} {} KB", bytes.len() / 1000), bytes))
        })
        .collect::<Result<_>>()?;
    let mut lines = Vec::new();
    let mut figures = Vec::new();
    let mut lat_rows = Vec::new();
    for path in [Path::Hardware, Path::Hybrid, Path::Cpu] {
        let loader = match path {
            Path::Cpu => None,
            _ => Some(loader(&args, path, max_batch)?),
        };
        if path == Path::Hardware {
            let mut probe = loader
                .as_ref()
                .map(|l| l.session())
                .transpose()
                .map_err(|e| anyhow!("session: {e}"))?;
            let counts = probe
                .as_mut()
                .and_then(|s| s.device_images()?.decode_counts());
            let first = images.first().map(|(_, b)| b.as_slice()).unwrap_or(&[]);
            if let Some(device) = probe.as_mut().and_then(|s| s.device_images()) {
                device
                    .decode(first)
                    .map_err(|e| anyhow!("probe decode: {e}"))?;
                let after = device.decode_counts().unwrap_or_default();
                if after.hardware == counts.unwrap_or_default().hardware {
                    lines.push(
                        "!!!!!!!! nvJPEG's hardware backend did not decode the first image: the 'hardware' rows are the hybrid path (see the server log line of GpuImages)".to_string(),
                    );
                }
            }
        }
        for (name, jpeg) in &images {
            let lat = latency(&args, loader.as_ref(), jpeg)?;
            lat_rows.push(format!(
                " {:<34} {:<9} {:>9.3} {:>9.3} {:>11.0}",
                name,
                path.name(),
                lat.p50 as f64 / 1e6,
                lat.p99 as f64 / 1e6,
                1e9 / lat.mean.max(1.0)
            ));
            for &t in &threads {
                for &b in &batches {
                    // The CPU decoder has no batch: one figure per thread count.
                    if path == Path::Cpu && b != batches[0] {
                        continue;
                    }
                    let (images_s, hardware_share) =
                        throughput(&args, loader.as_ref(), path, jpeg, b, t)?;
                    figures.push(Figure {
                        image: name.clone(),
                        path,
                        batch: if path == Path::Cpu { 1 } else { b },
                        threads: t,
                        images_s,
                        hardware_share,
                    });
                }
            }
        }
    }
    println!();
    println!(
        "bench_decode: nvJPEG hardware (batched) vs hybrid vs CPU (zune-jpeg), GPU {}",
        args.device
    );
    println!(
        " latency, one image per call, 1 thread ({} calls; GPU paths include the wait):",
        args.iters
    );
    println!(
        " {:<34} {:<9} {:>9} {:>9} {:>11}",
        "image", "path", "p50[ms]", "p99[ms]", "images/s"
    );
    for r in &lat_rows {
        println!("{r}");
    }
    println!(
        " throughput, {:.1} s per figure; GPU batches are decode + preprocessing kernel (stage_batch); 'hw share' = images the NVJPG engines decoded:",
        args.seconds
    );
    println!(
        " {:<34} {:<9} {:>6} {:>8} {:>11} {:>9}",
        "image", "path", "batch", "threads", "images/s", "hw share"
    );
    for f in &figures {
        println!(
            " {:<34} {:<9} {:>6} {:>8} {:>11.0} {:>9}",
            f.image,
            f.path.name(),
            f.batch,
            f.threads,
            f.images_s,
            f.hardware_share
                .map_or("-".into(), |s| format!("{:.0}%", s * 100.0))
        );
    }
    for l in &lines {
        println!("{l}");
    }
    if let Some(path) = &args.json {
        let mut out = String::new();
        for f in &figures {
            out.push_str(&format!(
                "{{\"image\": \"{}\", \"path\": \"{}\", \"batch\": {}, \"threads\": {}, \"images_s\": {:.1}}}\n",
                f.image,
                f.path.name(),
                f.batch,
                f.threads,
                f.images_s
            ));
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

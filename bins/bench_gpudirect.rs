//! Server time per request of `rdma_server -a 0` (host ring: the receive loop's copy, then
//! the engine uploads the payload) against `-a 1` (GPU-resident: the payload stays in the
//! GPU ring, the engine reads it there and writes the top-5 into the device reply ring), in
//! the same run, on one GPU. The `-a 1` path is driven through the loopback ring source
//! (device copies in place of the NIC's DMA), so it runs on a GPU machine without an RDMA
//! NIC. Server time = from the request being whole in the server's memory (host landing
//! slot / GPU slot) to its reply written (the reply's `replied` stamp); the host path is
//! timed on the pipeline directly (no queue hop: its figure is a lower bound). Also the
//! upload the GPU path avoids (pinned H2D of the payload), and the bytes each path's own
//! code moved between host and device per request. The goal: GPU-resident faster by at least
//! that upload.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use argh::FromArgs;
use hacserve::cli::results::run_info;
use hacserve_runtime::clock::realtime_ns;
use hacserve_runtime::engine::cudnn::{CudnnLoader, CudnnOptions, Precision};
use hacserve_runtime::engine::EngineLoader;
use hacserve_runtime::load::driver::RequestLog;
use hacserve_runtime::load::output::{write_requests_csv, REQUESTS_SCHEMA};
use hacserve_runtime::model_gen;
use hacserve_runtime::pipeline::{Pipeline, DEFAULT_MAX_IMAGE_PIXELS};
use hacserve_runtime::protocol::*;
use hacserve_runtime::results::unix_now;
use hacserve_runtime::server::gpu_loopback::{
    moved, ring_stream, GpuLoopback, RegisteredCopy, UploadProbe,
};
use hacserve_runtime::stats::{RequestRecord, Summary};

/// Measure -a 0 (host ring + upload) against -a 1 (GPU-resident) server time per request.
#[derive(FromArgs)]
struct Args {
    /// ONNX model (default: the generated ResNet-50, seed 50, written to the temp dir)
    #[argh(option)]
    engine_file: Option<PathBuf>,
    /// image the requests are made from (default: models/grace_hopper_500x546.jpg, the
    /// original's image size: raw 819 KB, processed 602 KB)
    #[argh(option, default = "PathBuf::from(\"models/grace_hopper_500x546.jpg\")")]
    image: PathBuf,
    /// timed requests per path and workload (default: 500)
    #[argh(option, default = "500")]
    iters: usize,
    /// untimed requests first (default: 50)
    #[argh(option, default = "50")]
    warmup: usize,
    /// GPU ordinal (default: 0)
    #[argh(option, default = "0")]
    device: usize,
    /// also write each path's timed requests as a results folder (run.json + requests.csv,
    /// docs/results.md) named <save-folder>-<workload>-a0 / -a1, for `report`
    #[argh(option)]
    save_folder: Option<PathBuf>,
}

const SLOT: usize = 2 << 20;
const DEPTH: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(30);

fn request(task: Task, id: u64, payload: &[u8]) -> Vec<u8> {
    let mut h = [0u8; HEADER_LEN];
    Header::request(task, 1, id, payload.len()).encode(&mut h);
    let mut m = h.to_vec();
    m.extend_from_slice(payload);
    m
}

/// The reply's body, after checking it is an answer.
fn answer(reply: &[u8], what: &str) -> Result<ResponseBody> {
    let (h, body) = Header::decode(reply, usize::MAX).map_err(|e| anyhow!("{what}: {e}"))?;
    if h.kind != MessageKind::Response {
        let (code, text) = decode_error(body).unwrap_or((0, "?".into()));
        return Err(anyhow!("{what}: error {code}: {text}"));
    }
    ResponseBody::decode(body).map_err(|e| anyhow!("{what}: {e}"))
}

/// One timed request as the results CSV holds it: `t0` is when the request was whole in the
/// server's memory (the stand-in for the NIC's last byte), `got` when the reply was back.
fn record(task: Task, i: usize, t0: u64, got: u64, body: &ResponseBody) -> RequestRecord {
    RequestRecord {
        client_id: 1,
        request_id: i as u64,
        task: task as u8,
        status: 0,
        client_sent: t0,
        server: body.timestamps,
        client_received: got,
        e2e_ns: got.saturating_sub(t0),
        top1: if body.top_k > 0 {
            body.classes[0] as i64
        } else {
            -1
        },
    }
}

/// Writes `<base>-<workload>-a<addressing>/`: run.json and requests.csv.
fn save(
    base: &std::path::Path,
    workload: &str,
    addressing: u8,
    payload: usize,
    model: &std::path::Path,
    rows: Vec<RequestRecord>,
) -> Result<PathBuf> {
    let folder = PathBuf::from(format!("{}-{workload}-a{addressing}", base.display()));
    std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    let mut log = RequestLog::with_capacity(rows.len());
    log.rows = rows.into_iter().map(|r| (0, r, 0)).collect();
    write_requests_csv(&folder.join("requests.csv"), &[log], &[1.0])
        .with_context(|| format!("writing {}/requests.csv", folder.display()))?;
    let mut info = run_info(
        "bench_gpudirect",
        if addressing == 1 {
            "gpudirect-loopback"
        } else {
            "rdma-host-loopback"
        },
    );
    info.task = Some(workload.into());
    info.payload_bytes = Some(payload);
    info.model = Some(model.display().to_string());
    info.backend = Some("gpu".into());
    info.precision = Some("fp16".into());
    info.addressing = Some(addressing.to_string());
    info.files = vec![("requests.csv".into(), REQUESTS_SCHEMA)];
    info.extra = vec![(
        "note".into(),
        "no NIC: the request is placed by a copy (host landing slot / device copy into the GPU slot); e2e = server time".into(),
    )];
    info.write(&folder, unix_now())
        .with_context(|| format!("writing {}/run.json", folder.display()))?;
    Ok(folder)
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

struct Row {
    workload: &'static str,
    payload: usize,
    host: Summary,
    /// The same with the copy slot registered with CUDA (what rdma_server -a 0 does now).
    registered: Summary,
    gpu: Summary,
    upload: Summary,
    host_bytes: f64,
    gpu_bytes: f64,
}

fn main() -> Result<()> {
    let args: Args = argh::from_env();
    hacserve_runtime::logging::init(false);
    let model = match &args.engine_file {
        Some(p) => p.clone(),
        None => {
            let p = std::env::temp_dir().join("hacserve-bench-gpudirect-resnet50.onnx");
            if !p.exists() {
                model_gen::write_model(&model_gen::resnet50(50), &p)
                    .context("writing the generated ResNet-50")?;
            }
            p
        }
    };
    let options = CudnnOptions {
        precision: Precision::Fp16,
        cuda_graph: true,
        gpu_decode: true,
        ..Default::default()
    };
    let loader = CudnnLoader::load_with(&model, args.device, options)
        .with_context(|| format!("loading {} on GPU {}", model.display(), args.device))?;
    let session = || loader.session().map_err(|e| anyhow!("engine session: {e}"));
    let mut host = Pipeline::new(session()?, SLOT, DEFAULT_MAX_IMAGE_PIXELS);
    let stream = ring_stream(args.device).map_err(|e| anyhow!(e))?;
    let server = GpuLoopback::start(
        vec![Pipeline::new(session()?, SLOT, DEFAULT_MAX_IMAGE_PIXELS)],
        &stream,
        args.device,
        DEPTH,
        SLOT,
    )
    .map_err(|e| anyhow!(e))?;

    let image = std::fs::read(&args.image).with_context(|| format!("{}", args.image.display()))?;
    let tensor = hacserve_runtime::client::prepare_payload(Task::Processed, &image, None)?;
    let raw = hacserve_runtime::client::prepare_payload(Task::Raw, &image, None)?;
    let workloads: Vec<(&'static str, Vec<u8>)> = vec![
        ("processed", request(Task::Processed, 0, &tensor)),
        ("raw", request(Task::Raw, 0, &raw)),
    ];

    let mut rows = Vec::new();
    for (workload, req) in &workloads {
        let payload = req.len() - HEADER_LEN;
        // The upload the GPU-resident path avoids: the payload from page-locked memory into
        // a device buffer, as the host path's engine does it.
        let mut upload = UploadProbe::new(args.device, payload).map_err(|e| anyhow!(e))?;
        let (mut host_ns, mut gpu_ns, mut upload_ns) = (Vec::new(), Vec::new(), Vec::new());
        let mut registered_ns = Vec::new();
        let mut registered = RegisteredCopy::new(args.device, req.len()).map_err(|e| anyhow!(e))?;
        if !registered.registered() {
            println!("NOTE: cuMemHostRegister refused the copy slot: its figures are pageable");
        }
        let (mut host_bytes, mut gpu_bytes) = (0u64, 0u64);
        let (mut host_rows, mut gpu_rows) = (Vec::new(), Vec::new());
        let task = if *workload == "raw" {
            Task::Raw
        } else {
            Task::Processed
        };
        let landing = req.clone();
        let mut copy = vec![0u8; req.len()];
        let mut out = Vec::with_capacity(SLOT);
        for i in 0..args.warmup + args.iters {
            let timed = i >= args.warmup;
            // -a 0: the request is whole in the host landing slot; the loop copies it out and
            // the pipeline runs (the engine uploads it, runs, downloads the logits).
            let before = moved();
            let t0 = realtime_ns();
            copy.copy_from_slice(&landing);
            host.handle_message(&copy, t0, &mut out);
            let got = realtime_ns();
            let body = answer(&out, "host path")?;
            let done = body.timestamps.replied;
            if timed {
                host_bytes += moved().since(&before).server();
                host_ns.push(done.saturating_sub(t0));
                if args.save_folder.is_some() {
                    host_rows.push(record(task, i, t0, got, &body));
                }
            }
            // -a 0 as rdma_server now runs it with a GPU backend: the copy slot is registered
            // with CUDA, so the engine's upload reads the request where it lies.
            let t0 = realtime_ns();
            registered.bytes_mut()[..landing.len()].copy_from_slice(&landing);
            host.handle_message(&registered.bytes_mut()[..landing.len()], t0, &mut out);
            let body = answer(&out, "host path, registered copy")?;
            if timed {
                registered_ns.push(body.timestamps.replied.saturating_sub(t0));
            }
            // -a 1: the stand-in NIC puts the request into the GPU slot; from then on it is
            // the server's.
            let slot = (i % DEPTH as usize) as u32;
            server.client.send(slot, req)?;
            let before = moved();
            let t0 = realtime_ns();
            server.client.recv(&mut out, TIMEOUT)?;
            let got = realtime_ns();
            let body = answer(&out, "GPU-resident path")?;
            let done = body.timestamps.replied;
            if timed {
                gpu_bytes += moved().since(&before).server();
                gpu_ns.push(done.saturating_sub(t0));
                if args.save_folder.is_some() {
                    gpu_rows.push(record(task, i, t0, got, &body));
                }
            }
            let took = upload.time().map_err(|e| anyhow!(e))?;
            if timed {
                upload_ns.push(took.as_nanos() as u64);
            }
        }
        if let Some(base) = &args.save_folder {
            for (addressing, rows) in [(0u8, host_rows), (1u8, gpu_rows)] {
                let folder = save(base, workload, addressing, payload, &model, rows)?;
                println!("saved {}", folder.display());
            }
        }
        let n = args.iters.max(1) as f64;
        rows.push(Row {
            workload,
            payload,
            host: Summary::of(&mut host_ns),
            registered: Summary::of(&mut registered_ns),
            gpu: Summary::of(&mut gpu_ns),
            upload: Summary::of(&mut upload_ns),
            host_bytes: host_bytes as f64 / n,
            gpu_bytes: gpu_bytes as f64 / n,
        });
    }
    let counters = server.stop();
    println!();
    println!(
        "bench_gpudirect: server time per request, {} on GPU {} (FP16, CUDA graph), {} timed after {} warm-up, same run",
        model.display(),
        args.device,
        args.iters,
        args.warmup
    );
    println!(
        "{:10} {:>9} | {:>22} | {:>22} | {:>22} | {:>10} | {:>12} | {:>17}",
        "workload",
        "payload",
        "-a 0 host+upload p50/p99",
        "-a 0 registered p50/p99",
        "-a 1 GPU-resident p50/p99",
        "saved p50",
        "upload p50",
        "host<->dev B/req"
    );
    let mut ok = true;
    for r in &rows {
        let saved = r.host.p50 as f64 - r.gpu.p50 as f64;
        ok &= saved >= r.upload.p50 as f64;
        println!(
            "{:10} {:>7} B | {:>9.1} / {:>8.1} us | {:>9.1} / {:>8.1} us | {:>9.1} / {:>8.1} us | {:>7.1} us | {:>9.1} us | {:>7.0} / {:>7.0}",
            r.workload,
            r.payload,
            us(r.host.p50),
            us(r.host.p99),
            us(r.registered.p50),
            us(r.registered.p99),
            us(r.gpu.p50),
            us(r.gpu.p99),
            saved / 1e3,
            us(r.upload.p50),
            r.host_bytes,
            r.gpu_bytes
        );
    }
    println!("(host<->dev B/req: bytes the server's own code moved, -a 0 / -a 1; the stand-in NIC's copies not counted; '-a 0 registered': the copy slot registered with CUDA, as rdma_server -a 0 with a GPU backend has it)");
    println!("server: {counters}");
    println!(
        "goal (GPU-resident faster by at least the upload it avoids): {}",
        if ok { "met" } else { "NOT met" }
    );
    ensure!(!rows.is_empty(), "no workload ran");
    Ok(())
}

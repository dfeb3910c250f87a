//! rdma_server: serves image classification over RDMA (RC queue pairs via rdma_cm; requests
//! and replies move with RDMA WRITE_WITH_IMM through per-client rings, see docs/rdma.md).

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::contract::ServerPollMode;
use hacserve_runtime::engine::registry::BackendChoice;
use hacserve_runtime::engine::BackendArgs;
use hacserve_runtime::labels::Labels;
use hacserve_runtime::pipeline::Pipeline;
use hacserve_runtime::protocol::{DEFAULT_MAX_PAYLOAD, HEADER_LEN};
use hacserve_runtime::server::{LoopPolicy, ServerOptions, ServerThreads};
use hacserve_runtime::transport::rdma::{
    check_available, Addressing, GpuRing, RdmaServer, RdmaServerConfig, DEFAULT_PORT, MAX_DEPTH,
    MAX_SLOT_SIZE, MIN_SLOT_SIZE,
};
use hacserve_runtime::{logging, signal};

#[derive(FromArgs)]
/// RDMA Server: answers classification requests (protocol v1) over RDMA WRITE_WITH_IMM rings.
struct Args {
    /// RDMA listen port
    #[argh(option, short = 'p', default = "DEFAULT_PORT")]
    port: u16,
    /// memory addressing: 0 = host memory, 1 = GPU memory (GPUDirect RDMA)
    #[argh(option, short = 'a', default = "0")]
    addressing: u8,
    /// use debug (per-request log lines)
    #[argh(switch, short = 'd')]
    debug: bool,
    /// keep alive: 1 = keep serving after clients leave, 0 = stop when the last one left
    #[argh(option, short = 'k', default = "1")]
    keep_alive: u8,
    /// monitor interval in seconds (0 = off)
    #[argh(option, short = 'i', default = "20")]
    monitor_interval: u64,
    /// logs folder
    #[argh(option, short = 'f', default = "PathBuf::from(\"results\")")]
    folder: PathBuf,
    /// save logs (per-request CSV in the logs folder at exit)
    #[argh(switch, short = 's')]
    save_logs: bool,
    /// per-request log capacity (requests recorded for -s)
    #[argh(option, default = "1000")]
    total_requests: usize,
    /// classes file (one ImageNet class name per line)
    #[argh(option, default = "PathBuf::from(\"models/imagenet_classes.txt\")")]
    classes_file: PathBuf,
    /// model file (ONNX)
    #[argh(option, default = "PathBuf::from(\"models/resnet50.onnx\")")]
    engine_file: PathBuf,
    /// engine contexts (each with its own CUDA stream and worker) per GPU; 0 = --workers
    /// (GPU backend; the CPU backend ignores it)
    #[argh(option, default = "0")]
    streams: u32,
    /// inference backend, by its registry name (default cpu = tract); `--backend help` lists
    /// every registered backend with the options it reads
    #[argh(option, default = "String::from(\"cpu\")")]
    backend: String,
    /// gpu backend precision: fp16 (NHWC, tensor cores), tf32 or fp32
    #[argh(option, default = "String::from(\"fp16\")")]
    precision: String,
    /// GPUs for the gpu backend, comma-separated (workers round-robin over them)
    #[argh(option, default = "String::from(\"0\")")]
    gpus: String,
    /// where the GPU backend decodes JPEGs: gpu (nvJPEG + preprocessing kernel) or cpu
    #[argh(option, default = "String::from(\"gpu\")")]
    decode: String,
    /// GPU backend with GPU decode: JPEG requests ready together run as one batch of up to
    /// this many (1 = off; a lone request never waits for company)
    #[argh(option, default = "8")]
    max_batch: usize,
    /// high priority clients: 1 = requests flagged priority jump the queue
    #[argh(option, default = "0")]
    priority_clients: u8,
    /// number of worker threads, each with its own engine context
    #[argh(option, default = "1")]
    workers: usize,
    /// intra-op threads per worker for the CPU backend
    #[argh(option, default = "1")]
    threads: usize,
    /// busy (spin), block (sleep when idle), hybrid (receive loop spins, workers sleep until a
    /// request is queued) or auto (busy with a core per thread, else hybrid with two cores)
    #[argh(option, default = "String::from(\"auto\")")]
    poll_mode: String,
    /// largest request slot a client may ask for, in bytes (bounds header + payload)
    #[argh(option, default = "2 << 20")]
    slot_size: u32,
    /// largest ring depth (requests in flight) a client may ask for
    #[argh(option, default = "64")]
    ring_depth: u32,
    /// largest request payload in bytes (also bounded by each client's slot size)
    #[argh(option, default = "DEFAULT_MAX_PAYLOAD")]
    max_payload: usize,
    /// requests queued per priority lane before new ones get Overloaded
    #[argh(option, default = "1024")]
    queue_depth: usize,
    /// address to bind (default all RDMA-capable interfaces)
    #[argh(option, default = "String::from(\"0.0.0.0\")")]
    bind_address: String,
    /// do not pin threads to cores
    #[argh(switch)]
    no_pin: bool,
}

fn main() -> Result<()> {
    let args: Args = argh::from_env();
    logging::init(args.debug);
    signal::install_stop_handler();
    if !(MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&args.slot_size) {
        bail!("--slot-size must be {MIN_SLOT_SIZE}..={MAX_SLOT_SIZE} bytes");
    }
    if args.ring_depth == 0 || args.ring_depth > MAX_DEPTH {
        bail!("--ring-depth must be 1..={MAX_DEPTH}");
    }
    let backend = match BackendChoice::parse(&BackendArgs {
        backend: &args.backend,
        precision: &args.precision,
        gpus: &args.gpus,
        decode: &args.decode,
        threads: args.threads,
        workers: args.workers,
        streams: args.streams,
        max_batch: args.max_batch,
    }) {
        // `--backend help`: the registry's list, not an error.
        Err(e) if e.is_help() => {
            println!("{e}");
            return Ok(());
        }
        chosen => chosen?,
    };
    let workers = backend.workers;
    let ring_gpu = match (args.addressing, backend.gpus().first()) {
        (0, _) => None,
        (1, Some(&gpu)) => Some(gpu),
        (1, None) => bail!("-a 1 (GPU memory) needs --backend gpu"),
        (other, _) => {
            bail!("-a/--addressing must be 0 (host memory) or 1 (GPU memory), not {other}")
        }
    };
    let ip: IpAddr = args.bind_address.parse().with_context(|| {
        format!(
            "--bind-address {:?} is not an IP address",
            args.bind_address
        )
    })?;
    let mode = ServerPollMode::parse(&args.poll_mode, workers).map_err(anyhow::Error::msg)?;
    // RDMA first: a machine without it fails fast, before the model is loaded.
    let max_payload = args.max_payload.min(args.slot_size as usize - HEADER_LEN);
    let listening = || format!("listening on {}:{}", args.bind_address, args.port);
    check_available().with_context(listening)?;
    // The rings' GPU stream comes from the backend, which owns the device contexts.
    let addressing = match ring_gpu {
        None => Addressing::Host,
        Some(gpu) => Addressing::Gpu(GpuRing {
            ordinal: gpu,
            stream: backend
                .device_stream(gpu)
                .map_err(|e| anyhow!("GPU addressing on GPU {gpu}: {e}"))
                .with_context(listening)?,
        }),
    };
    let cfg = RdmaServerConfig {
        max_slot_size: args.slot_size,
        max_depth: args.ring_depth,
        keep_alive: args.keep_alive != 0,
        addressing,
    };
    let mut rdma = RdmaServer::listen(SocketAddr::new(ip, args.port), cfg, max_payload)
        .with_context(|| format!("listening on {}:{}", args.bind_address, args.port))?;
    let priority_clients = args.priority_clients != 0;
    let pipelines: Vec<Pipeline> = backend
        .sessions(&args.engine_file, priority_clients)?
        .into_iter()
        .map(|session| Pipeline::new(session, max_payload))
        .collect();
    Labels::log_availability(&args.classes_file);
    let opts = ServerOptions {
        workers,
        max_payload,
        poll_mode: mode.receive,
        worker_poll_mode: mode.workers,
        queue_depth: args.queue_depth,
        priority_clients,
        priority_workers: backend.priority_workers(priority_clients),
        monitor_interval: Duration::from_secs(args.monitor_interval),
        log_folder: args.save_logs.then(|| args.folder.clone()),
        log_capacity: args.total_requests,
        pin_threads: !args.no_pin,
        debug: args.debug,
        policy: LoopPolicy::AnswerWithoutEngine,
    };
    let mut threads = ServerThreads::start(&opts, &mut rdma, pipelines)
        .context("starting worker and monitor threads")?;
    println!(
        "rdma_server listening on {} | {} | model {} | backend {} | {} workers | poll {} | slots up to {} x {} B",
        rdma.addr(),
        match ring_gpu {
            None => "host memory".to_string(),
            Some(g) => format!("GPU memory (GPU {g}, GPUDirect RDMA)"),
        },
        args.engine_file.display(),
        backend.describe(),
        workers,
        mode.name(),
        args.ring_depth,
        args.slot_size
    );
    let served = threads.serve(&mut rdma, &opts);
    threads
        .report_stop(
            "rdma_server",
            backend.gpus(),
            opts.log_folder.as_deref(),
            served.records,
        )
        .with_context(|| format!("writing the request log into {}", args.folder.display()))?;
    served.result.context("serving")?;
    Ok(())
}

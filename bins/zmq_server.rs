//! zmq_server: serves image classification over ZeroMQ/TCP.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::engine::cudnn_gpu::{CudnnLoader, CudnnOptions, Precision};
use hacserve_runtime::engine::tract_cpu::TractLoader;
use hacserve_runtime::engine::EngineLoader;
use hacserve_runtime::labels::Labels;
use hacserve_runtime::libzmq::Context;
use hacserve_runtime::pipeline::Pipeline;
use hacserve_runtime::protocol::DEFAULT_MAX_PAYLOAD;
use hacserve_runtime::server::{self, PollMode, ServerOptions, ServerThreads};
use hacserve_runtime::transport::zmq::ZmqServer;
use hacserve_runtime::{logging, signal};

#[derive(FromArgs)]
/// ZMQ Server: answers classification requests (protocol v1) on a ROUTER socket.
struct Args {
    /// ZMQ listen port (0 = any free port, printed at start)
    #[argh(option, default = "5555")]
    port: u16,
    /// use debug (per-request log lines)
    #[argh(switch, short = 'd')]
    debug: bool,
    /// classes file (one ImageNet class name per line)
    #[argh(option, default = "PathBuf::from(\"models/imagenet_classes.txt\")")]
    classes_file: PathBuf,
    /// model file (ONNX)
    #[argh(option, default = "PathBuf::from(\"models/resnet50.onnx\")")]
    engine_file: PathBuf,
    /// number of CUDA streams and engine contexts (GPU backend; the CPU backend ignores it)
    #[argh(option, default = "0")]
    streams: u32,
    /// number of worker threads, each with its own engine context
    #[argh(option, default = "1")]
    workers: usize,
    /// logs folder
    #[argh(option, short = 'f', default = "PathBuf::from(\"results\")")]
    folder: PathBuf,
    /// monitor interval in seconds (0 = off)
    #[argh(option, short = 'i', default = "20")]
    monitor_interval: u64,
    /// save logs (per-request CSV in the logs folder at exit)
    #[argh(switch, short = 's')]
    save_logs: bool,
    /// high priority clients: 1 = requests flagged priority jump the queue
    #[argh(option, default = "0")]
    priority_clients: u8,
    /// per-request log capacity (requests recorded for -s)
    #[argh(option, default = "1000")]
    total_requests: usize,
    /// address to bind (default all interfaces)
    #[argh(option, default = "String::from(\"0.0.0.0\")")]
    bind_address: String,
    /// largest request payload in bytes (default 16 MiB)
    #[argh(option, default = "DEFAULT_MAX_PAYLOAD")]
    max_payload: usize,
    /// requests queued per priority lane before new ones get Overloaded
    #[argh(option, default = "1024")]
    queue_depth: usize,
    /// busy (spin), block (sleep) or auto (spin only with a core per thread)
    #[argh(option, default = "String::from(\"auto\")")]
    poll_mode: String,
    /// inference backend: cpu (tract) or gpu (cuDNN/cuBLAS, CUDA graph)
    #[argh(option, default = "String::from(\"cpu\")")]
    backend: String,
    /// gpu backend precision: fp16 (NHWC, tensor cores), tf32 or fp32
    #[argh(option, default = "String::from(\"fp16\")")]
    precision: String,
    /// GPUs for the gpu backend, comma-separated (workers are spread over them round-robin,
    /// each with its own engine context and stream)
    #[argh(option, default = "String::from(\"0\")")]
    gpus: String,
    /// intra-op threads per worker for the CPU backend
    #[argh(option, default = "1")]
    threads: usize,
    /// do not pin threads to cores
    #[argh(switch)]
    no_pin: bool,
}

fn main() -> Result<()> {
    let args: Args = argh::from_env();
    logging::init(args.debug);
    signal::install_stop_handler();
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let gpus: Vec<usize> = args
        .gpus
        .split(',')
        .map(|g| {
            g.trim()
                .parse::<usize>()
                .with_context(|| format!("bad GPU id {g:?} in --gpus"))
        })
        .collect::<Result<_>>()?;
    if gpus.is_empty() {
        bail!("--gpus names no GPU");
    }
    if args.streams > 0 {
        log::info!(
            "--streams {}: each worker owns one engine context and stream; use --workers",
            args.streams
        );
    }
    let mode = PollMode::parse(&args.poll_mode, args.workers + 1).map_err(anyhow::Error::msg)?;
    // One loader per device: the CPU, or each GPU of --gpus; worker i uses loader i % n.
    let loaders: Vec<Box<dyn EngineLoader>> = match args.backend.as_str() {
        "cpu" => vec![Box::new(
            TractLoader::load(&args.engine_file, args.threads)
                .with_context(|| format!("loading model {}", args.engine_file.display()))?,
        )],
        "gpu" => {
            let options = CudnnOptions {
                batch: 1,
                precision: match args.precision.as_str() {
                    "fp16" => Precision::Fp16,
                    "tf32" => Precision::Tf32,
                    "fp32" => Precision::Fp32,
                    other => bail!("--precision {other:?}: use fp16, tf32 or fp32"),
                },
                cuda_graph: true,
                gpu_decode: true,
            };
            let mut v: Vec<Box<dyn EngineLoader>> = Vec::new();
            for &g in &gpus {
                v.push(Box::new(
                    CudnnLoader::load_with(&args.engine_file, g, options).with_context(|| {
                        format!("loading model {} on GPU {g}", args.engine_file.display())
                    })?,
                ));
            }
            v
        }
        other => bail!("--backend {other:?} is not known: use cpu or gpu"),
    };
    let mut pipelines = Vec::with_capacity(args.workers);
    for i in 0..args.workers {
        let session = loaders[i % loaders.len()]
            .session()
            .with_context(|| format!("creating the engine context of worker {i}"))?;
        pipelines.push(Pipeline::new(session, args.max_payload));
    }
    match Labels::load(&args.classes_file, None) {
        Ok(labels) => log::info!(
            "{} class names from {}",
            labels.len(),
            args.classes_file.display()
        ),
        Err(e) => log::warn!("class names unavailable ({e}); replies carry class ids only"),
    }

    let ctx = Context::new().context("creating the ZeroMQ context")?;
    let mut zmq = ZmqServer::bind(&ctx, &args.bind_address, args.port, args.max_payload)
        .with_context(|| format!("binding tcp://{}:{}", args.bind_address, args.port))?;
    let mut workers = Vec::with_capacity(args.workers);
    for p in pipelines {
        workers.push((
            p,
            zmq.reply_sink().context("creating a worker reply socket")?,
        ));
    }
    let opts = ServerOptions {
        workers: args.workers,
        max_payload: args.max_payload,
        poll_mode: mode,
        queue_depth: args.queue_depth,
        priority_clients: args.priority_clients != 0,
        monitor_interval: Duration::from_secs(args.monitor_interval),
        log_folder: args.save_logs.then(|| args.folder.clone()),
        log_capacity: args.total_requests,
        pin_threads: !args.no_pin,
        debug: args.debug,
    };
    let mut threads =
        ServerThreads::start(&opts, workers).context("starting worker and monitor threads")?;
    let backend = if args.backend == "gpu" {
        format!("cudnn-gpu {} on GPUs {}", args.precision, args.gpus)
    } else {
        format!("tract-cpu x{} threads", args.threads)
    };
    println!(
        "zmq_server listening on {} | model {} | backend {backend} | {} workers | poll {:?} | max payload {} B",
        zmq.endpoint(),
        args.engine_file.display(),
        args.workers,
        mode,
        args.max_payload
    );
    let result = zmq.run(&threads.queue, &opts, threads.receive_probe());
    let mut records = result.as_ref().map(Vec::clone).unwrap_or_default();
    records.extend(threads.join());
    // Requests accepted before the stop were finished by the workers: deliver their replies.
    match zmq.flush_replies(&threads.queue, Duration::from_millis(200)) {
        Ok(0) => {}
        Ok(n) => log::info!("delivered {n} replies finished after the stop"),
        Err(e) => log::error!("flushing replies after the stop: {e}"),
    }
    println!("zmq_server stopped: {}", threads.counters_summary());
    if args.backend == "gpu" {
        // Each GPU's share of the requests (workers are assigned round-robin).
        let mut per_gpu = vec![0u64; gpus.len()];
        for (i, p) in threads.probes[1..].iter().enumerate() {
            per_gpu[i % gpus.len()] += p.handled.load(std::sync::atomic::Ordering::Relaxed);
        }
        let shares: Vec<String> = gpus
            .iter()
            .zip(&per_gpu)
            .map(|(g, n)| format!("gpu {g}: {n}"))
            .collect();
        println!("zmq_server requests per GPU: {}", shares.join(", "));
    }
    if let Some(folder) = &opts.log_folder {
        let path = server::write_server_log(folder, records)
            .with_context(|| format!("writing the request log into {}", folder.display()))?;
        println!("request log: {}", path.display());
    }
    result.context("serving")?;
    Ok(())
}

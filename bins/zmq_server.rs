//! zmq_server: serves image classification over ZeroMQ/TCP.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::contract::ServerPollMode;
use hacserve_runtime::engine::registry::BackendChoice;
use hacserve_runtime::engine::BackendArgs;
use hacserve_runtime::labels::Labels;
use hacserve_runtime::libzmq::Context;
use hacserve_runtime::pipeline::Pipeline;
use hacserve_runtime::protocol::DEFAULT_MAX_PAYLOAD;
use hacserve_runtime::server::{LoopPolicy, ServerOptions, ServerThreads};
use hacserve_runtime::transport::zmq::{ZmqServer, DEFAULT_REPLY_HWM};
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
    /// engine contexts (each with its own CUDA stream and worker) per GPU; 0 = --workers
    /// (GPU backend; the CPU backend ignores it)
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
    /// replies queued per client before further ones are dropped (a client that does not
    /// read its replies; counted per client)
    #[argh(option, default = "DEFAULT_REPLY_HWM")]
    reply_hwm: usize,
    /// busy (spin), block (sleep), hybrid (receive loop spins, workers sleep until a request
    /// is queued) or auto (busy with a core per thread, else hybrid with two cores)
    #[argh(option, default = "String::from(\"auto\")")]
    poll_mode: String,
    /// inference backend, by its registry name (default cpu = tract); `--backend help` lists
    /// every registered backend with the options it reads
    #[argh(option, default = "String::from(\"cpu\")")]
    backend: String,
    /// gpu backend precision: fp16 (NHWC, tensor cores), tf32 or fp32
    #[argh(option, default = "String::from(\"fp16\")")]
    precision: String,
    /// GPUs for the gpu backend, comma-separated (workers are spread over them round-robin,
    /// each with its own engine context and stream)
    #[argh(option, default = "String::from(\"0\")")]
    gpus: String,
    /// where the GPU backend decodes JPEGs: gpu (nvJPEG + preprocessing kernel) or cpu
    #[argh(option, default = "String::from(\"gpu\")")]
    decode: String,
    /// GPU backend with GPU decode: JPEG requests ready together run as one batch of up to
    /// this many (1 = off; a lone request never waits for company)
    #[argh(option, default = "8")]
    max_batch: usize,
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
    let mode = ServerPollMode::parse(&args.poll_mode, workers).map_err(anyhow::Error::msg)?;
    let priority_clients = args.priority_clients != 0;
    let pipelines: Vec<Pipeline> = backend
        .sessions(&args.engine_file, priority_clients)?
        .into_iter()
        .map(|session| Pipeline::new(session, args.max_payload))
        .collect();
    Labels::log_availability(&args.classes_file);

    let ctx = Context::new().context("creating the ZeroMQ context")?;
    let mut zmq = ZmqServer::bind(
        &ctx,
        &args.bind_address,
        args.port,
        args.max_payload,
        args.reply_hwm,
    )
    .with_context(|| format!("binding tcp://{}:{}", args.bind_address, args.port))?;
    let opts = ServerOptions {
        workers,
        max_payload: args.max_payload,
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
    let mut threads = ServerThreads::start(&opts, &mut zmq, pipelines)
        .context("starting worker and monitor threads")?;
    println!(
        "zmq_server listening on {} | model {} | backend {} | {} workers | poll {} | max payload {} B",
        zmq.endpoint(),
        args.engine_file.display(),
        backend.describe(),
        workers,
        mode.name(),
        args.max_payload
    );
    let served = threads.serve(&mut zmq, &opts);
    threads
        .report_stop(
            "zmq_server",
            backend.gpus(),
            opts.log_folder.as_deref(),
            served.records,
        )
        .with_context(|| format!("writing the request log into {}", args.folder.display()))?;
    if let Some(drops) = zmq.slow_peer_summary() {
        println!("zmq_server replies dropped, clients not reading: {drops}");
    }
    served.result.context("serving")?;
    Ok(())
}

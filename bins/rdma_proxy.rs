//! rdma_proxy: RDMA clients in (listens like rdma_server), RDMA out to a backend rdma_server
//! over `-c` pipelined connections. The receive loop (main thread) queues every request
//! untouched (echoes too: the backend answers them); one forwarder thread sends them on and
//! writes each backend reply into the response slot of the inbound request it answers.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::proxy::{format_shares, ConnShare, PoolConfig, RdmaPool};
use hacserve_runtime::server::{PollMode, ServerOptions, WorkQueue, WorkerProbe};
use hacserve_runtime::transport::rdma::{
    Addressing, RdmaJob, RdmaReplySink, RdmaServer, RdmaServerConfig, DEFAULT_PORT, MAX_DEPTH,
    MAX_SLOT_SIZE, MIN_SLOT_SIZE,
};
use hacserve_runtime::transport::ReplySink;
use hacserve_runtime::{logging, signal};

#[derive(FromArgs)]
/// RDMA Proxy: forwards RDMA requests to a backend rdma_server over RDMA.
struct Args {
    /// backend RDMA server address
    #[argh(option, default = "String::from(\"7.7.7.2\")")]
    server_address: String,
    /// backend RDMA server port
    #[argh(option, default = "DEFAULT_PORT")]
    target_port: u16,
    /// RDMA listen port
    #[argh(option, short = 'p', default = "DEFAULT_PORT")]
    port: u16,
    /// total requests (informational: the proxy forwards until stopped)
    #[argh(option, short = 'r', default = "1000000")]
    requests: usize,
    /// task (informational: every task is forwarded)
    #[argh(option, short = 't', default = "3")]
    task: u32,
    /// save logs (informational: the proxy keeps no per-request log)
    #[argh(switch, short = 's')]
    save_logs: bool,
    /// logs folder (informational)
    #[argh(option, short = 'f', default = "PathBuf::from(\"results\")")]
    folder: PathBuf,
    /// use debug
    #[argh(switch, short = 'd')]
    debug: bool,
    /// keep alive: 1 serve until stopped, 0 stop when the last client has left
    #[argh(option, short = 'k', default = "1")]
    keep_alive: u32,
    /// RDMA connections to the backend
    #[argh(option, short = 'c', default = "1")]
    connections: usize,
    /// model name (informational)
    #[argh(option, default = "String::from(\"resnet50\")")]
    model_name: String,
    /// requests in flight per backend connection (its ring depth)
    #[argh(option, default = "4")]
    target_ring_depth: u32,
    /// largest slot an inbound client may ask for, and the backend connections' slot size
    #[argh(option, default = "2 << 20")]
    slot_size: u32,
    /// largest ring depth an inbound client may ask for
    #[argh(option, default = "64")]
    ring_depth: u32,
    /// requests waiting for the forwarder (and for a free backend slot) before Overloaded
    #[argh(option, default = "1024")]
    queue_depth: usize,
    /// busy (spin), block or auto
    #[argh(option, default = "String::from(\"auto\")")]
    poll_mode: String,
    /// address to bind
    #[argh(option, default = "String::from(\"0.0.0.0\")")]
    bind_address: String,
    /// backend connection timeout in ms
    #[argh(option, default = "10000")]
    timeout_ms: u64,
    /// client id the first backend connection announces (then +1 each)
    #[argh(option, default = "2000")]
    connection_id: u32,
}

/// Runs on its own thread: owns the backend connections (set up here, reported through
/// `ready`), moves queued jobs to the backend and replies back to their inbound slots.
fn forwarder(
    cfg: PoolConfig,
    queue: Arc<WorkQueue<RdmaJob>>,
    ready: mpsc::Sender<Result<(), String>>,
) -> (Vec<ConnShare>, u64) {
    let mut pool: RdmaPool<RdmaJob> = match RdmaPool::connect(&cfg) {
        Ok(p) => {
            let _ = ready.send(Ok(()));
            p
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{:#}", anyhow::Error::from(e))));
            return (Vec::new(), 0);
        }
    };
    let mut sink = RdmaReplySink;
    let mut reply = |job: RdmaJob, bytes: &[u8]| {
        if let Err(e) = sink.reply(job, bytes) {
            log::warn!("reply could not be delivered to its client: {e}");
        }
    };
    let mut idle = 0u32;
    while !signal::stop_requested() {
        let mut progress = 0;
        while let Some(job) = queue.pop() {
            progress += 1;
            pool.submit(job, &mut reply);
        }
        progress += pool.poll(&mut reply);
        if pool.live_connections() == 0 {
            log::error!("every RDMA connection to the backend is lost: stopping");
            signal::request_stop();
            break;
        }
        if progress > 0 {
            idle = 0;
        } else {
            idle = idle.saturating_add(1);
            if cfg.mode == PollMode::Block && idle > 64 {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
    (pool.shares().to_vec(), pool.local_errors)
}

fn main() -> Result<()> {
    let args: Args = argh::from_env();
    logging::init(args.debug);
    signal::install_stop_handler();
    if args.connections == 0 {
        bail!("-c/--connections must be at least 1");
    }
    for (name, depth) in [
        ("--ring-depth", args.ring_depth),
        ("--target-ring-depth", args.target_ring_depth),
    ] {
        if depth == 0 || depth > MAX_DEPTH {
            bail!("{name} must be 1..={MAX_DEPTH}");
        }
    }
    if !(MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&args.slot_size) {
        bail!("--slot-size must be {MIN_SLOT_SIZE}..={MAX_SLOT_SIZE} bytes");
    }
    let _informational = (args.requests, args.task, args.save_logs, &args.folder);
    let ip: IpAddr = args.bind_address.parse().with_context(|| {
        format!(
            "--bind-address {:?} is not an IP address",
            args.bind_address
        )
    })?;
    // Two spinning threads: the receive loop and the forwarder.
    let mode = PollMode::parse(&args.poll_mode, 2).map_err(anyhow::Error::msg)?;
    let queue = Arc::new(WorkQueue::new(args.queue_depth, mode));
    let pool_cfg = PoolConfig {
        host: args.server_address.clone(),
        port: args.target_port,
        connections: args.connections,
        client_id_base: args.connection_id,
        slot_size: args.slot_size,
        depth: args.target_ring_depth,
        timeout: Duration::from_millis(args.timeout_ms),
        mode,
        queue_limit: args.queue_depth,
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let fq = queue.clone();
    let fwd = std::thread::Builder::new()
        .name("forwarder".into())
        .spawn(move || forwarder(pool_cfg, fq, ready_tx))
        .context("starting the forwarder thread")?;
    // The backend first: without it the proxy is useless.
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("connecting to the backend rdma_server: {e}"),
        Err(_) => bail!("the forwarder thread died while connecting"),
    }
    let cfg = RdmaServerConfig {
        max_slot_size: args.slot_size,
        max_depth: args.ring_depth,
        keep_alive: args.keep_alive != 0,
        addressing: Addressing::Host,
    };
    let listened = RdmaServer::listen(SocketAddr::new(ip, args.port), cfg)
        .with_context(|| format!("listening on {}:{}", args.bind_address, args.port));
    let mut rdma = match listened {
        Ok(r) => r,
        Err(e) => {
            signal::request_stop();
            let _ = fwd.join();
            return Err(e);
        }
    };
    rdma.forward_all(true);
    let opts = ServerOptions {
        workers: 1,
        // Payload limits are the backend's business; the slot bounds what arrives.
        max_payload: args.slot_size as usize,
        poll_mode: mode,
        worker_poll_mode: mode,
        queue_depth: args.queue_depth,
        priority_clients: false,
        priority_workers: 0,
        monitor_interval: Duration::ZERO,
        log_folder: None,
        log_capacity: 0,
        pin_threads: false,
        debug: args.debug,
    };
    println!(
        "rdma_proxy listening on {} | model {} | backend {}:{} x{} connections, {} slots x {} B | poll {mode:?}",
        rdma.addr(),
        args.model_name,
        args.server_address,
        args.target_port,
        args.connections,
        args.target_ring_depth,
        args.slot_size
    );
    let probe = WorkerProbe::new();
    let result = rdma.run(&queue, &opts, &probe);
    signal::request_stop();
    let (shares, local) = fwd
        .join()
        .map_err(|_| anyhow!("the forwarder thread panicked"))?;
    use std::sync::atomic::Ordering::Relaxed;
    println!(
        "rdma_proxy stopped: received {} overloaded {} | {} | answered by the proxy: {local}",
        queue.counters.received.load(Relaxed),
        queue.counters.overloaded.load(Relaxed),
        format_shares(&shares)
    );
    result.context("serving")?;
    Ok(())
}

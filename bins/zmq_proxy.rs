//! zmq_proxy: ZeroMQ clients in (ROUTER), RDMA out to an rdma_server over `-c` pipelined
//! connections. The serving core's receive loop takes requests on the ZeroMQ transport and
//! queues them untouched; the proxy's forwarder thread sends them on and hands each reply
//! back with its client's envelope, so every reply reaches the client that sent the request
//! (`hacserve_runtime::proxy`). Message bytes (and so the header's ids) pass through.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::libzmq::Context;
use hacserve_runtime::proxy::{format_shares, PoolConfig, Proxy};
use hacserve_runtime::server::{LoopPolicy, ServerOptions};
use hacserve_runtime::transport::rdma::{DEFAULT_PORT, MAX_DEPTH, MAX_SLOT_SIZE, MIN_SLOT_SIZE};
use hacserve_runtime::transport::zmq::{ZmqServer, DEFAULT_REPLY_HWM};
use hacserve_runtime::{logging, signal};

#[derive(FromArgs)]
/// ZMQ Proxy: forwards ZeroMQ (TCP) requests to an rdma_server over RDMA.
struct Args {
    /// RDMA server address
    #[argh(option, default = "String::from(\"7.7.7.2\")")]
    server_address: String,
    /// RDMA server port
    #[argh(option, default = "DEFAULT_PORT")]
    rdma_port: u16,
    /// ZMQ listen port (0 = any free port, printed at start)
    #[argh(option, default = "5555")]
    zmq_port: u16,
    /// use debug (a line per request)
    #[argh(switch, short = 'd')]
    debug: bool,
    /// total requests (informational: the proxy forwards until stopped)
    #[argh(option, short = 'r', default = "1000000")]
    requests: usize,
    /// task (informational: the proxy forwards every task)
    #[argh(option, short = 't', default = "3")]
    task: u32,
    /// save logs (informational: the proxy keeps no per-request log)
    #[argh(switch, short = 's')]
    save_logs: bool,
    /// logs folder (informational)
    #[argh(option, short = 'f', default = "PathBuf::from(\"results\")")]
    folder: PathBuf,
    /// RDMA connections to the server
    #[argh(option, short = 'c', default = "1")]
    clients: usize,
    /// model name (informational)
    #[argh(option, default = "String::from(\"resnet50\")")]
    model_name: String,
    /// requests in flight per RDMA connection (its ring depth)
    #[argh(option, default = "4")]
    ring_depth: u32,
    /// RDMA slot size in bytes: the largest request forwarded (default 256 KiB)
    #[argh(option, default = "256 * 1024")]
    slot_size: u32,
    /// requests waiting for a free slot before new ones are answered Overloaded
    #[argh(option, default = "1024")]
    queue_depth: usize,
    /// busy (spin), block or auto
    #[argh(option, default = "String::from(\"auto\")")]
    poll_mode: String,
    /// address to bind
    #[argh(option, default = "String::from(\"0.0.0.0\")")]
    bind_address: String,
    /// connection timeout in ms
    #[argh(option, default = "10000")]
    timeout_ms: u64,
    /// print per-connection counts every this many seconds (0 = only at exit)
    #[argh(option, short = 'i', default = "20")]
    monitor_interval: u64,
    /// client id the first RDMA connection announces to the server (then +1 each)
    #[argh(option, default = "1000")]
    connection_id: u32,
    /// replies queued per client before further ones are dropped (a client that does not
    /// read its replies; counted per client)
    #[argh(option, default = "DEFAULT_REPLY_HWM")]
    reply_hwm: usize,
}

fn main() -> Result<()> {
    let args: Args = argh::from_env();
    logging::init(args.debug);
    signal::install_stop_handler();
    // Two spinning threads: the receive loop and the forwarder.
    let mode = PollMode::parse(&args.poll_mode, 2).map_err(anyhow::Error::msg)?;
    if args.clients == 0 {
        bail!("-c/--clients must be at least 1");
    }
    if args.ring_depth == 0 || args.ring_depth > MAX_DEPTH {
        bail!("--ring-depth must be 1..={MAX_DEPTH}");
    }
    if !(MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&args.slot_size) {
        bail!("--slot-size must be {MIN_SLOT_SIZE}..={MAX_SLOT_SIZE}");
    }
    let _informational = (args.requests, args.task, args.save_logs, &args.folder);
    let pool_cfg = PoolConfig {
        host: args.server_address.clone(),
        port: args.rdma_port,
        connections: args.clients,
        client_id_base: args.connection_id,
        slot_size: args.slot_size,
        depth: args.ring_depth,
        timeout: Duration::from_millis(args.timeout_ms),
        mode,
        queue_limit: args.queue_depth,
    };
    let ctx = Context::new().context("creating the ZeroMQ context")?;
    // Larger requests could not be forwarded anyway (the pool answers PayloadTooLarge).
    let max_payload = args.slot_size as usize;
    let mut zmq = ZmqServer::bind(
        &ctx,
        &args.bind_address,
        args.zmq_port,
        max_payload,
        args.reply_hwm,
    )
    .with_context(|| format!("binding tcp://{}:{}", args.bind_address, args.zmq_port))?;
    let opts = ServerOptions {
        workers: 1,
        max_payload,
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
        policy: LoopPolicy::ForwardAll,
    };
    let mut proxy = Proxy::start(
        &opts,
        &mut zmq,
        pool_cfg,
        ("zmq_proxy", Duration::from_secs(args.monitor_interval)),
    )
    .map_err(|e| anyhow!("connecting to the rdma_server: {e}"))?;
    println!(
        "zmq_proxy listening on {} | model {} | rdma {}:{} x{} connections, {} slots x {} B | poll {mode:?}",
        zmq.endpoint(), args.model_name, args.server_address, args.rdma_port, args.clients, args.ring_depth, args.slot_size
    );
    let (served, report) = proxy.serve(&mut zmq, &opts);
    println!(
        "zmq_proxy stopped: {} | answered by the proxy: {}",
        format_shares(&report.shares),
        report.local_errors
    );
    if let Some(drops) = zmq.slow_peer_summary() {
        println!("zmq_proxy replies dropped, clients not reading: {drops}");
    }
    served.result.context("serving")?;
    if report.backend_lost {
        bail!("every RDMA connection to the server is lost");
    }
    Ok(())
}

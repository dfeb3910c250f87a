//! rdma_proxy: RDMA clients in (listens like rdma_server), RDMA out to a backend rdma_server
//! over `-c` pipelined connections. The serving core's receive loop (main thread) queues
//! every request untouched (echoes too: the backend answers them); the proxy's forwarder
//! thread sends them on and writes each backend reply into the response slot of the inbound
//! request it answers (`hacserve_runtime::proxy`).

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::proxy::{format_shares, PoolConfig, Proxy};
use hacserve_runtime::server::{LoopPolicy, ServerOptions};
use hacserve_runtime::transport::rdma::{
    Addressing, RdmaServer, RdmaServerConfig, DEFAULT_PORT, MAX_DEPTH, MAX_SLOT_SIZE, MIN_SLOT_SIZE,
};
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
    let cfg = RdmaServerConfig {
        max_slot_size: args.slot_size,
        max_depth: args.ring_depth,
        keep_alive: args.keep_alive != 0,
        addressing: Addressing::Host,
    };
    // Payload limits are the backend's business; the slot bounds what arrives.
    let max_payload = args.slot_size as usize;
    let mut rdma = RdmaServer::listen(SocketAddr::new(ip, args.port), cfg, max_payload)
        .with_context(|| format!("listening on {}:{}", args.bind_address, args.port))?;
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
    // The backend first: without it the proxy is useless.
    let mut proxy = Proxy::start(&opts, &mut rdma, pool_cfg, ("rdma_proxy", Duration::ZERO))
        .map_err(|e| anyhow!("connecting to the backend rdma_server: {e}"))?;
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
    let (served, report) = proxy.serve(&mut rdma, &opts);
    let c = proxy.counters();
    println!(
        "rdma_proxy stopped: received {} overloaded {} | {} | answered by the proxy: {}",
        c.received.load(Relaxed),
        c.overloaded.load(Relaxed),
        format_shares(&report.shares),
        report.local_errors
    );
    served.result.context("serving")?;
    Ok(())
}

//! rdma_proxy: RDMA clients in (listens like rdma_server), RDMA out to a backend rdma_server
//! over `-c` pipelined connections. The serving core's receive loop (main thread) queues
//! every request untouched (echoes too: the backend answers them); the proxy's forwarder
//! thread sends them on and writes each backend reply into the response slot of the inbound
//! request it answers (`hacserve_runtime::proxy`).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use hacserve::cli::bind_ip;
use hacserve::cli::proxy::{forward, Backend};
use hacserve_runtime::check;
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::transport::rdma::{
    check_geometry, Addressing, PdShare, RdmaServer, ZeroCopy, DEFAULT_PORT,
};

hacserve::cli_args! {
    /// RDMA Proxy: forwards RDMA requests to a backend rdma_server over RDMA.
    struct Args [proxy, ring_limits, metrics, check] {
        /// backend RDMA server port
        #[argh(option, default = "DEFAULT_PORT")]
        target_port: u16,
        /// RDMA listen port
        #[argh(option, short = 'p', default = "DEFAULT_PORT")]
        port: u16,
        /// keep alive: 1 serve until stopped, 0 stop when the last client has left
        #[argh(option, short = 'k', default = "1")]
        keep_alive: u32,
        /// RDMA connections to the backend
        #[argh(option, short = 'c', default = "1")]
        connections: usize,
        /// requests in flight per backend connection (its ring depth; its slots are
        /// --slot-size)
        #[argh(option, default = "4")]
        target_ring_depth: u32,
        /// client id the first backend connection announces (then +1 each)
        #[argh(option, default = "2000")]
        connection_id: u32,
        /// forward without copying: on (requests go to the backend from the inbound ring
        /// slot they landed in, replies to the client from the backend response slot, one
        /// shared protection domain) or off (each copied, three payload copies a request)
        #[argh(option, default = "String::from(\"on\")")]
        zero_copy: String,
    }
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    if args.check {
        return hacserve::cli::check::report("rdma_proxy", &[check::rdma()]);
    }
    let (proxy, ring) = (args.proxy(), args.ring_limits());
    let (mode, placement) = proxy.prepare()?;
    if args.connections == 0 {
        bail!("-c/--connections must be at least 1");
    }
    ring.check()?;
    check_geometry(args.target_ring_depth, ring.slot_size)
        .context("--target-ring-depth: the backend connections' ring")?;
    let zero_copy = hacserve::cli::on_off(&args.zero_copy, "--zero-copy")?;
    let pd_share = zero_copy.then(PdShare::new);
    let ip = bind_ip(&proxy.bind_address)?;
    let backend = Backend {
        port: args.target_port,
        connections: args.connections,
        client_id_base: args.connection_id,
        slot_size: ring.slot_size,
        depth: args.target_ring_depth,
        fast_path: ring.fast_path == "on",
        pd_share: pd_share.clone(),
    };
    let events = mode == PollMode::Event;
    let cfg = ring.server_config(args.keep_alive != 0, Addressing::Host, events);
    // Payload limits are the backend's business; the slot bounds what arrives.
    let max_payload = ring.slot_size as usize;
    let zc = pd_share.map(|pd| ZeroCopy { pd });
    let mut rdma = RdmaServer::listen_with(SocketAddr::new(ip, args.port), cfg, max_payload, zc)
        .with_context(|| format!("listening on {}:{}", proxy.bind_address, args.port))?;
    let monitor = ("rdma_proxy", Duration::ZERO);
    let stopped = forward(
        &proxy,
        &args.metrics(),
        (mode, placement),
        &backend,
        max_payload,
        &mut rdma,
        monitor,
        "backend rdma_server",
        |rdma| {
            format!(
            "rdma_proxy listening on {} | model {} | backend {}:{} x{} connections, {} slots x {} B | poll {mode:?} | zero-copy {}",
            rdma.addr(),
            proxy.model_name,
            proxy.server_address,
            args.target_port,
            args.connections,
            args.target_ring_depth,
            ring.slot_size,
            if zero_copy { "on" } else { "off" }
        )
        },
    )?;
    println!("rdma_proxy stopped: {}", stopped.shares);
    stopped.result.context("serving")?;
    Ok(())
}

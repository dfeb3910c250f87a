//! zmq_proxy: ZeroMQ clients in (ROUTER), RDMA out to an rdma_server over `-c` pipelined
//! connections. The serving core's receive loop takes requests on the ZeroMQ transport and
//! queues them untouched; the proxy's forwarder thread sends them on and hands each reply
//! back with its client's envelope, so every reply reaches the client that sent the request
//! (`hacserve_runtime::proxy`). Message bytes (and so the header's ids) pass through.

#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use hacserve::cli::proxy::{forward, Backend};
use hacserve_runtime::check;
use hacserve_runtime::libzmq::Context;
use hacserve_runtime::transport::rdma::{check_geometry, DEFAULT_PORT};
use hacserve_runtime::transport::zmq::{ZmqServer, DEFAULT_REPLY_HWM};

hacserve::cli_args! {
    /// ZMQ Proxy: forwards ZeroMQ (TCP) requests to an rdma_server over RDMA.
    struct Args [proxy, metrics, check] {
        /// RDMA server port
        #[argh(option, default = "DEFAULT_PORT")]
        rdma_port: u16,
        /// ZMQ listen port (0 = any free port, printed at start)
        #[argh(option, default = "5555")]
        zmq_port: u16,
        /// RDMA connections to the server
        #[argh(option, short = 'c', default = "1")]
        clients: usize,
        /// requests in flight per RDMA connection (its ring depth)
        #[argh(option, default = "4")]
        ring_depth: u32,
        /// RDMA slot size in bytes: the largest request forwarded (default 1 MiB: room for
        /// a raw request of a 500x546 image, 819 KB, the original's largest)
        #[argh(option, default = "1 << 20")]
        slot_size: u32,
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
        /// ask the RDMA server for the memory-polled fast path on the backend connections:
        /// on or off (default on; a server that does not grant it is used as before)
        #[argh(option, default = "String::from(\"on\")")]
        fast_path: String,
    }
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    if args.check {
        return hacserve::cli::check::report("zmq_proxy", &[check::rdma()]);
    }
    let proxy = args.proxy();
    let (mode, placement) = proxy.prepare()?;
    if args.clients == 0 {
        bail!("-c/--clients must be at least 1");
    }
    check_geometry(args.ring_depth, args.slot_size)?;
    let backend = Backend {
        port: args.rdma_port,
        connections: args.clients,
        client_id_base: args.connection_id,
        slot_size: args.slot_size,
        depth: args.ring_depth,
        fast_path: hacserve::cli::on_off(&args.fast_path, "--fast-path")?,
        // The inbound side is ZeroMQ: each request is copied into a backend send slot and
        // each reply out of its response slot (docs/rdma.md, "Zero-copy rdma_proxy").
        pd_share: None,
    };
    let ctx = Context::new().context("creating the ZeroMQ context")?;
    // Larger requests could not be forwarded anyway (the pool answers PayloadTooLarge).
    let max_payload = args.slot_size as usize;
    let mut zmq = ZmqServer::bind(
        &ctx,
        &proxy.bind_address,
        args.zmq_port,
        max_payload,
        args.reply_hwm,
    )
    .with_context(|| format!("binding tcp://{}:{}", proxy.bind_address, args.zmq_port))?;
    let monitor = ("zmq_proxy", Duration::from_secs(args.monitor_interval));
    let stopped = forward(
        &proxy,
        &args.metrics(),
        (mode, placement),
        &backend,
        max_payload,
        &mut zmq,
        monitor,
        "rdma_server",
        |zmq| {
            format!(
            "zmq_proxy listening on {} | model {} | rdma {}:{} x{} connections, {} slots x {} B | poll {mode:?}",
            zmq.endpoint(), proxy.model_name, proxy.server_address, args.rdma_port, args.clients, args.ring_depth, args.slot_size
        )
        },
    )?;
    println!("zmq_proxy stopped: {}", stopped.shares);
    if let Some(drops) = zmq.slow_peer_summary() {
        println!("zmq_proxy replies dropped, clients not reading: {drops}");
    }
    stopped.result.context("serving")?;
    Ok(())
}

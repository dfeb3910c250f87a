//! zmq_proxy: ZeroMQ clients in (ROUTER), RDMA out to an rdma_server over `-c` pipelined
//! connections. Each request's ZeroMQ envelope is kept until its reply comes back on the RDMA
//! side, so every reply reaches the client that sent the request; message bytes (and so the
//! header's client/request ids) pass through untouched.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::libzmq::{Context, Message, PollSet, PollTarget, Socket, SocketType};
use hacserve_runtime::libzmq::{DONTWAIT, SNDMORE};
use hacserve_runtime::proxy::{format_shares, PoolConfig, ProxyRequest, RdmaPool};
use hacserve_runtime::server::PollMode;
use hacserve_runtime::transport::rdma::{DEFAULT_PORT, MAX_DEPTH, MAX_SLOT_SIZE, MIN_SLOT_SIZE};
use hacserve_runtime::{logging, signal};

/// Routing frames kept per request (client identity, REQ delimiter, broker hops).
const MAX_FRAMES: usize = 8;

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
}

/// A request held while its RDMA twin is in flight: the envelope plus the message frame.
struct ZmqRequest {
    frames: Vec<Message>,
}

impl ProxyRequest for ZmqRequest {
    fn message(&self) -> &[u8] {
        self.frames.last().map(Message::as_slice).unwrap_or(&[])
    }
}

/// Receives one multipart message; None when nothing is waiting (or it had too many frames).
fn recv_request(s: &Socket) -> Result<Option<ZmqRequest>> {
    let mut first = Message::new();
    let mut more = match s.recv_msg(&mut first, DONTWAIT) {
        Ok(m) => m,
        Err(e) if e.would_block() || e.interrupted() => return Ok(None),
        Err(e) => return Err(e).context("receiving from the frontend"),
    };
    let mut frames = vec![first];
    while more {
        let mut f = Message::new();
        if frames.len() == MAX_FRAMES {
            s.drain_more(&mut f)
                .context("dropping an oversized message")?;
            log::error!("message with more than {MAX_FRAMES} frames dropped");
            return Ok(None);
        }
        more = s.recv_msg(&mut f, 0).context("receiving a frame")?;
        frames.push(f);
    }
    if frames.len() < 2 {
        // No envelope: a reply could not be routed back (not a DEALER/REQ peer).
        log::warn!("message without a routing envelope dropped");
        return Ok(None);
    }
    Ok(Some(ZmqRequest { frames }))
}

fn send_reply(s: &Socket, mut req: ZmqRequest, reply: &[u8], debug: bool) {
    let n = req.frames.len() - 1;
    if debug {
        let (c, r, t) = hacserve_runtime::transport::ids_of(reply);
        log::info!(
            "reply client {c} request {r} task {t}: {} bytes",
            reply.len()
        );
    }
    let mut result = Ok(());
    for (i, f) in req.frames[..n].iter_mut().enumerate() {
        let flags = SNDMORE | if i == 0 { DONTWAIT } else { 0 };
        result = s.send_msg(f, flags);
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = s.send(reply, 0);
    }
    if let Err(e) = result {
        // The client went away (ROUTER_MANDATORY): nothing else to do with the reply.
        log::warn!("reply could not be delivered to its client: {e}");
    }
}

fn main() -> Result<()> {
    let args: Args = argh::from_env();
    logging::init(args.debug);
    signal::install_stop_handler();
    // Only this thread spins.
    let mode = PollMode::parse(&args.poll_mode, 1).map_err(anyhow::Error::msg)?;
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
    let mut pool: RdmaPool<ZmqRequest> = RdmaPool::connect(&PoolConfig {
        host: args.server_address.clone(),
        port: args.rdma_port,
        connections: args.clients,
        client_id_base: args.connection_id,
        slot_size: args.slot_size,
        depth: args.ring_depth,
        timeout: Duration::from_millis(args.timeout_ms),
        mode,
        queue_limit: args.queue_depth,
    })
    .context("connecting to the rdma_server")?;

    let ctx = Context::new().context("creating the ZeroMQ context")?;
    let frontend = ctx
        .socket(SocketType::Router)
        .context("creating the ROUTER")?;
    frontend.set_router_mandatory(true)?;
    frontend.set_hwm(100_000)?;
    // Larger messages could not be forwarded anyway; libzmq drops them at the socket.
    frontend.set_max_msg_size(4 * i64::from(args.slot_size))?;
    let local = format!(
        "tcp://{}:{}",
        args.bind_address,
        if args.zmq_port == 0 {
            "*".to_string()
        } else {
            args.zmq_port.to_string()
        }
    );
    frontend
        .bind(&local)
        .with_context(|| format!("binding {local}"))?;
    let endpoint = frontend.last_endpoint()?;
    println!(
        "zmq_proxy listening on {endpoint} | model {} | rdma {}:{} x{} connections, {} slots x {} B | poll {mode:?}",
        args.model_name, args.server_address, args.rdma_port, args.clients, args.ring_depth, args.slot_size
    );

    let debug = args.debug;
    let mut reply = |req: ZmqRequest, bytes: &[u8]| send_reply(&frontend, req, bytes, debug);
    let targets = [PollTarget::Socket(&frontend)];
    let mut poll = PollSet::new(&targets);
    let monitor = Duration::from_secs(args.monitor_interval);
    let mut last_report = Instant::now();
    let mut idle = 0u32;
    while !signal::stop_requested() {
        // With nothing in flight only the frontend can wake us: block on it (short timeout
        // for the stop flag). Otherwise RDMA completions must be polled, so never block long.
        let timeout = if pool.busy() == 0 && mode == PollMode::Block {
            100
        } else {
            0
        };
        match poll.poll(timeout) {
            Ok(_) => {}
            Err(e) if e.interrupted() => continue,
            Err(e) => return Err(e).context("polling the frontend"),
        }
        let mut progress = 0;
        while let Some(req) = recv_request(&frontend)? {
            progress += 1;
            pool.submit(req, &mut reply);
        }
        progress += pool.poll(&mut reply);
        if pool.live_connections() == 0 {
            bail!("every RDMA connection to the server is lost");
        }
        if progress > 0 {
            idle = 0;
        } else {
            idle = idle.saturating_add(1);
            if mode == PollMode::Block && idle > 64 {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        if !monitor.is_zero() && last_report.elapsed() >= monitor {
            last_report = Instant::now();
            println!("[zmq_proxy] {}", format_shares(pool.shares()));
        }
    }
    println!(
        "zmq_proxy stopped: {} | answered by the proxy: {}",
        format_shares(pool.shares()),
        pool.local_errors
    );
    Ok(())
}

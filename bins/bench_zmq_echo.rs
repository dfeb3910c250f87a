//! Benchmark: echo round trip through zmq_server (protocol v2, queue, worker, inproc reply
//! hop) against a plain libzmq REQ/REP ping-pong of the same message size, both over TCP
//! loopback, both servers in their own process, in the same run. Prints figures and ratios.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::client::{run_closed_loop, ClientOptions, RequestPayload};
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::libzmq::{Context, Message, SocketType};
use hacserve_runtime::model_gen;
use hacserve_runtime::protocol::{Task, HEADER_LEN, RESPONSE_BODY_LEN};
use hacserve_runtime::signal;
use hacserve_runtime::stats::Summary;
use hacserve_runtime::transport::zmq::ZmqClient;

#[derive(FromArgs)]
/// Echo round trip: hacserve zmq_server vs libzmq REQ/REP ping-pong, same sizes, same run.
struct Args {
    /// payload sizes in bytes, comma-separated
    #[argh(option, default = "String::from(\"64,1024,16384,153600\")")]
    sizes: String,
    /// measured round trips per size and side
    #[argh(option, default = "5000")]
    iters: usize,
    /// unmeasured round trips first
    #[argh(option, default = "500")]
    warmup: usize,
    /// block or busy, for both sides' waiting (server, client and peer)
    #[argh(option, default = "String::from(\"block\")")]
    poll_mode: String,
    /// model the server loads (echo never runs it); generated tiny ResNet if absent
    #[argh(option)]
    model: Option<PathBuf>,
    /// internal: run as the REQ/REP peer's echo server
    #[argh(switch)]
    peer_server: bool,
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    signal::install_stop_handler();
    if args.peer_server {
        return peer_server(&args.poll_mode);
    }
    let mode = PollMode::parse(&args.poll_mode, 1).map_err(anyhow::Error::msg)?;
    let sizes: Vec<usize> = args
        .sizes
        .split(',')
        .map(|s| s.trim().parse().with_context(|| format!("bad size {s:?}")))
        .collect::<Result<_>>()?;
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("no directory for {}", exe.display()))?;
    let model = match args.model.clone() {
        Some(m) => m,
        None => {
            let p = std::env::temp_dir().join("hacserve-bench-resnet_tiny.onnx");
            model_gen::write_model(&model_gen::tiny_resnet(50), &p)?;
            p
        }
    };
    let mut server = spawn_listening(
        Command::new(dir.join("zmq_server")).args([
            "--port",
            "0",
            "--bind-address",
            "127.0.0.1",
            "--engine-file",
            model.to_str().unwrap_or_default(),
            "--poll-mode",
            &args.poll_mode,
            "-i",
            "0",
        ]),
        "zmq_server",
    )?;
    let mut peer = spawn_listening(
        Command::new(&exe).args(["--peer-server", "--poll-mode", &args.poll_mode]),
        "REQ/REP peer",
    )?;
    let ctx = Context::new()?;
    println!(
        "echo round trip over TCP loopback, {} iterations per size, poll mode {mode:?}",
        args.iters
    );
    println!("hacserve: zmq_client path -> zmq_server (ROUTER, queue, worker, inproc PUSH/PULL) -> reply = header+96 B body+payload");
    println!("peer:     libzmq REQ -> REP echo server (one thread), reply = request, request = header+payload");
    println!(
        "{:>9} | {:>10} {:>10} {:>10} | {:>10} {:>10} {:>10} | {:>8} {:>8}",
        "size[B]", "ours p50", "p99", "mean[us]", "zmq p50", "p99", "mean[us]", "p50 x", "mean x"
    );
    for &size in &sizes {
        let ours = measure_ours(&ctx, server.1, size, &args, mode)?;
        let theirs = measure_peer(&ctx, peer.1, size, &args, mode)?;
        let us = |v: u64| v as f64 / 1e3;
        println!(
            "{:>9} | {:>10.1} {:>10.1} {:>10.1} | {:>10.1} {:>10.1} {:>10.1} | {:>8.2} {:>8.2}",
            size,
            us(ours.p50),
            us(ours.p99),
            ours.mean / 1e3,
            us(theirs.p50),
            us(theirs.p99),
            theirs.mean / 1e3,
            ours.p50 as f64 / theirs.p50 as f64,
            ours.mean / theirs.mean
        );
    }
    println!("ratio = hacserve / plain libzmq (1.00 = same round trip; lower is better)");
    stop(&mut server.0);
    stop(&mut peer.0);
    Ok(())
}

fn measure_ours(
    ctx: &Context,
    port: u16,
    size: usize,
    args: &Args,
    mode: PollMode,
) -> Result<Summary> {
    let max_reply = HEADER_LEN + RESPONSE_BODY_LEN + size;
    let mut c = ZmqClient::connect(
        ctx,
        "127.0.0.1",
        port,
        Duration::from_secs(10),
        mode,
        max_reply,
    )?;
    let opts = ClientOptions {
        client_id: 1,
        logits: false,
        requests: args.iters,
        priority: false,
        warmup: args.warmup,
        max_reply,
        debug: false,
        reconnect_within: Duration::ZERO,
    };
    let echo = [RequestPayload {
        task: Task::Echo,
        bytes: vec![0u8; size],
    }];
    let run = run_closed_loop(&mut c, &opts, &echo);
    if let Some(e) = run.failure {
        bail!("hacserve echo failed: {e}");
    }
    if let Some(r) = run.records.iter().find(|r| r.status != 0) {
        bail!("server answered error {} to an echo", r.status);
    }
    let mut rtts: Vec<u64> = run.records.iter().map(|r| r.e2e_ns).collect();
    Ok(Summary::of(&mut rtts))
}

fn measure_peer(
    ctx: &Context,
    port: u16,
    size: usize,
    args: &Args,
    mode: PollMode,
) -> Result<Summary> {
    let req = ctx.socket(SocketType::Req)?;
    req.connect(&format!("tcp://127.0.0.1:{port}"))?;
    req.set_rcvtimeo(10_000)?;
    let msg = vec![0u8; HEADER_LEN + size];
    let mut reply = Message::new();
    let mut rtts = Vec::with_capacity(args.iters);
    for i in 0..args.warmup + args.iters {
        let t0 = Instant::now();
        req.send(&msg, 0)?;
        match mode {
            PollMode::Block | PollMode::Event => {
                req.recv_msg(&mut reply, 0)?;
            }
            PollMode::Busy => loop {
                match req.recv_msg(&mut reply, hacserve_runtime::libzmq::DONTWAIT) {
                    Ok(_) => break,
                    Err(e) if e.would_block() => std::hint::spin_loop(),
                    Err(e) => return Err(e.into()),
                }
            },
        }
        let rtt = t0.elapsed().as_nanos() as u64;
        if reply.len() != msg.len() {
            bail!("peer echoed {} bytes, sent {}", reply.len(), msg.len());
        }
        if i >= args.warmup {
            rtts.push(rtt);
        }
    }
    Ok(Summary::of(&mut rtts))
}

/// The peer: a REP socket that sends every message straight back (ZeroMQ's local_lat shape).
fn peer_server(poll_mode: &str) -> Result<()> {
    let busy = poll_mode == "busy";
    let ctx = Context::new()?;
    let rep = ctx.socket(SocketType::Rep)?;
    rep.bind("tcp://127.0.0.1:*")?;
    rep.set_rcvtimeo(100)?;
    println!("peer listening on {}", rep.last_endpoint()?);
    let mut msg = Message::new();
    while !signal::stop_requested() {
        let flags = if busy {
            hacserve_runtime::libzmq::DONTWAIT
        } else {
            0
        };
        match rep.recv_msg(&mut msg, flags) {
            Ok(_) => rep.send_msg(&mut msg, 0)?,
            Err(e) if e.would_block() || e.interrupted() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn spawn_listening(cmd: &mut Command, what: &str) -> Result<(Child, u16)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let port = loop {
        let line = lines
            .next()
            .ok_or_else(|| anyhow!("{what} exited before listening"))??;
        if let Some(at) = line.find("listening on tcp://") {
            let endpoint = line[at..].split_whitespace().nth(2).unwrap_or_default();
            break endpoint
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| anyhow!("{what}: no port in {line:?}"))?;
        }
    };
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, port))
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

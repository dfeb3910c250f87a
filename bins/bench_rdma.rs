//! bench_rdma: our RDMA path against perftest, measured in the same run on the same devices.
//!
//! Runs inside the Soft-RoCE VM (or on any host with an RDMA device and perftest):
//!
//! ```text
//! tests/testbed/run-in-vm.sh target/release/bench_rdma                 # one host
//! bench_rdma --serve --host 192.0.2.1 &      # two hosts: the server side, on 192.0.2.1 ...
//! bench_rdma --peer --host 192.0.2.1         # ... and the client side, same options on both
//! ```
//!
//! For every message size of `--sizes` (default 64 B, 4 KB, 64 KB, 1 MB): `ib_write_lat -R -s
//! SIZE` (half the ping-pong round trip, RTT/2, each iteration timed), then for every
//! configuration of `--modes` an echo ping-pong of a SIZE-byte request (header included) from
//! this process against `rdma_server`, one in flight, each round trip timed, reported as RTT/2
//! in perftest's columns with its ratio to ib_write_lat's typical and average.
//!
//! Configurations: `busy` (rdma_server `--poll-mode busy`, client spinning, WRITE_WITH_IMM),
//! `hybrid` (server hybrid: the receive loop spins, the worker sleeps), `event` (server and
//! client sleep on completion channels) and `fast` (server hybrid with the memory-polled fast
//! path granted: messages of at most 8 KiB go as one plain WRITE whose last word the receiver
//! polls; larger ones take WRITE_WITH_IMM on the same connection).
//!
//! Bandwidth: `ib_write_bw -R -s 150528` (128 writes in flight) against a pipelined stream of
//! `--depth` requests from this process per configuration: sink requests (the payload is
//! discarded, the replies are 128 bytes: one way, as ib_write_bw) and echo requests (the
//! payload comes back). MB/sec is perftest's unit (2^20 bytes/s of request payload).
//!
//! Proxy: the `--proxy` configuration's round trips through `rdma_proxy` (client -> proxy ->
//! server) next to the same configuration direct, at `--proxy-sizes`; the goal is that the
//! proxy adds at most one hop's RTT/2 (the direct RTT/2).
//!
//! Two hosts: `--serve` starts the perftest servers (one port per size, restarted after each
//! run), one rdma_server per configuration and the proxy, and waits for SIGTERM; `--peer` runs
//! the client side against them. Ports: rdma_server of configuration i at `--port` + i, the
//! proxy at `--port` + 10, ib_write_lat of size i at `--perftest-port` + i, ib_write_bw at
//! `--perftest-port` + 10.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::contract::{ClientTransport, PollMode};
use hacserve_runtime::protocol::{Header, MessageKind, Task, HEADER_LEN, RESPONSE_BODY_LEN};
use hacserve_runtime::signal;
use hacserve_runtime::transport::rdma::{
    RdmaClient, RdmaClientConfig, DEFAULT_PORT, FAST_MAX_LEN, FAST_WORD_LEN,
};

#[derive(FromArgs)]
/// RDMA benchmark: perftest (ib_write_lat / ib_write_bw) vs rdma_server, per configuration.
struct Args {
    /// address of the RDMA device of the server side (and of the clients, on one host)
    #[argh(option, default = "String::from(\"192.0.2.1\")")]
    host: String,
    /// first rdma_server port (configuration i listens on this + i, the proxy on this + 10)
    #[argh(option, default = "DEFAULT_PORT")]
    port: u16,
    /// first perftest port (size i on this + i, ib_write_bw on this + 10)
    #[argh(option, default = "18515")]
    perftest_port: u16,
    /// iterations (perftest -n) and measured requests per size below 256 KiB and per stream
    #[argh(option, short = 'n', default = "2000")]
    iterations: usize,
    /// iterations for sizes of 256 KiB and more
    #[argh(option, default = "200")]
    big_iterations: usize,
    /// unmeasured requests before each of our measurements
    #[argh(option, default = "200")]
    warmup: usize,
    /// latency message sizes in bytes, comma-separated (ours: header + payload = this)
    #[argh(option, default = "String::from(\"64,4096,65536,1048576\")")]
    sizes: String,
    /// configurations, comma-separated: busy, hybrid, event, fast
    #[argh(option, default = "String::from(\"busy,hybrid,event,fast\")")]
    modes: String,
    /// bandwidth test message size in bytes (our payload)
    #[argh(option, default = "150528")]
    bw_size: usize,
    /// requests in flight for the streams
    #[argh(option, default = "16")]
    depth: u32,
    /// configuration measured through rdma_proxy (none: no proxy rows)
    #[argh(option, default = "String::from(\"fast\")")]
    proxy: String,
    /// sizes of the proxy comparison, comma-separated
    #[argh(option, default = "String::from(\"64,4096\")")]
    proxy_sizes: String,
    /// rdma_proxy's --poll-mode (auto: busy with a core per spinning thread, else block)
    #[argh(option, default = "String::from(\"auto\")")]
    proxy_poll_mode: String,
    /// rdma_proxy's --forwarder placements measured, comma-separated, each in turn (inline,
    /// thread, auto); with --serve only the first
    #[argh(option, default = "String::from(\"inline,thread\")")]
    proxy_forwarder: String,
    /// model file for rdma_server (echo never runs it; a small one starts fast)
    #[argh(option, default = "PathBuf::from(\"models/resnet_tiny.onnx\")")]
    engine_file: PathBuf,
    /// directory holding rdma_server and rdma_proxy (default: next to this binary)
    #[argh(option)]
    bin_dir: Option<PathBuf>,
    /// skip perftest (only our figures)
    #[argh(switch)]
    no_perftest: bool,
    /// two hosts: run the server side only (perftest servers, rdma_servers, proxy) until
    /// SIGTERM
    #[argh(switch)]
    serve: bool,
    /// two hosts: run the client side only, against `bench_rdma --serve` on --host
    #[argh(switch)]
    peer: bool,
    /// append every row to this CSV file (label,section,row,bytes,iterations,p50_us,p99_us,
    /// avg_us,mib_s,ratio)
    #[argh(option)]
    csv: Option<PathBuf>,
    /// label of this run in the CSV (e.g. the boot)
    #[argh(option, default = "String::new()")]
    label: String,
}

/// One configuration of server and client.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Mode {
    name: &'static str,
    server_poll: &'static str,
    client: PollMode,
    fast: bool,
}

impl Mode {
    fn parse(name: &str) -> Result<Mode> {
        let (name, server_poll, client, fast) = match name {
            "busy" => ("busy", "busy", PollMode::Busy, false),
            "hybrid" => ("hybrid", "hybrid", PollMode::Busy, false),
            "event" => ("event", "event", PollMode::Event, false),
            "fast" => ("fast", "hybrid", PollMode::Busy, true),
            other => bail!("--modes: {other:?} is not one of busy, hybrid, event, fast"),
        };
        Ok(Mode {
            name,
            server_poll,
            client,
            fast,
        })
    }
}

/// Offset of the proxy's port from --port, and of ib_write_bw's from --perftest-port.
const PROXY_PORT_OFFSET: u16 = 10;
const BW_PORT_OFFSET: u16 = 10;
/// Sizes from here on use --big-iterations.
const BIG_SIZE: usize = 256 << 10;

/// What one run measures, parsed from the options.
struct Plan {
    sizes: Vec<usize>,
    modes: Vec<Mode>,
    proxy: Option<(usize, Mode)>,
    proxy_sizes: Vec<usize>,
    proxy_forwarders: Vec<String>,
    bin_dir: PathBuf,
}

impl Plan {
    fn new(args: &Args) -> Result<Plan> {
        let list = |s: &str, what: &str| -> Result<Vec<usize>> {
            s.split(',')
                .map(|t| {
                    let v: usize = t.trim().parse().with_context(|| format!("{what}: {t:?}"))?;
                    if v <= HEADER_LEN {
                        bail!("{what}: {v} does not exceed the {HEADER_LEN}-byte header");
                    }
                    Ok(v)
                })
                .collect()
        };
        let sizes = list(&args.sizes, "--sizes")?;
        if sizes.len() > BW_PORT_OFFSET as usize {
            bail!("--sizes: at most {BW_PORT_OFFSET} sizes");
        }
        let modes = args
            .modes
            .split(',')
            .map(|m| Mode::parse(m.trim()))
            .collect::<Result<Vec<_>>>()?;
        if modes.len() > PROXY_PORT_OFFSET as usize {
            bail!("--modes: at most {PROXY_PORT_OFFSET} configurations");
        }
        let proxy = match args.proxy.as_str() {
            "none" => None,
            name => {
                let m = Mode::parse(name)?;
                let i = modes
                    .iter()
                    .position(|x| *x == m)
                    .with_context(|| format!("--proxy {name}: not among --modes"))?;
                Some((i, m))
            }
        };
        let bin_dir = match &args.bin_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()
                .context("locating this binary")?
                .parent()
                .context("this binary's directory")?
                .to_path_buf(),
        };
        Ok(Plan {
            sizes,
            modes,
            proxy,
            proxy_sizes: list(&args.proxy_sizes, "--proxy-sizes")?,
            proxy_forwarders: args
                .proxy_forwarder
                .split(',')
                .map(|f| f.trim().to_string())
                .collect(),
            bin_dir,
        })
    }

    fn iterations(args: &Args, size: usize) -> usize {
        if size >= BIG_SIZE {
            args.big_iterations
        } else {
            args.iterations
        }
    }
}
/// One latency row of the table, in µs: perftest's columns.
#[derive(Debug, Clone, Copy)]
struct Lat {
    bytes: usize,
    iterations: usize,
    min: f64,
    max: f64,
    typical: f64,
    avg: f64,
    stdev: f64,
    p99: f64,
    p999: f64,
}

impl Lat {
    /// perftest's row: #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%.
    fn from_perftest(row: &[f64]) -> Lat {
        Lat {
            bytes: row[0] as usize,
            iterations: row[1] as usize,
            min: row[2],
            max: row[3],
            typical: row[4],
            avg: row[5],
            stdev: row[6],
            p99: row[7],
            p999: row[8],
        }
    }

    /// Order statistics of `us` (nearest rank, as the client's table).
    fn of(bytes: usize, iterations: usize, mut us: Vec<f64>) -> Result<Lat> {
        if us.is_empty() {
            bail!("no latency samples");
        }
        us.sort_by(f64::total_cmp);
        let n = us.len();
        let rank = |p: f64| us[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        let mean = us.iter().sum::<f64>() / n as f64;
        let var = us.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        Ok(Lat {
            bytes,
            iterations,
            min: us[0],
            max: us[n - 1],
            typical: rank(0.50),
            avg: mean,
            stdev: var.sqrt(),
            p99: rank(0.99),
            p999: rank(0.999),
        })
    }

    /// The same row scaled (RTT -> RTT/2: perftest reports half the ping-pong).
    fn scaled(&self, k: f64) -> Lat {
        Lat {
            min: self.min * k,
            max: self.max * k,
            typical: self.typical * k,
            avg: self.avg * k,
            stdev: self.stdev * k,
            p99: self.p99 * k,
            p999: self.p999 * k,
            ..*self
        }
    }
}

/// One bandwidth row: MiB/s (perftest's MB, 2^20) and messages per second.
#[derive(Debug, Clone, Copy)]
struct Bw {
    bytes: usize,
    iterations: usize,
    peak: Option<f64>,
    avg: f64,
    msg_rate: Option<f64>,
}

impl Bw {
    /// perftest's row: #bytes #iterations BW peak BW average MsgRate[Mpps].
    fn from_perftest(row: &[f64]) -> Bw {
        Bw {
            bytes: row[0] as usize,
            iterations: row[1] as usize,
            peak: Some(row[2]),
            avg: row[3],
            msg_rate: Some(row[4] * 1e6),
        }
    }
}

/// perftest's arguments for one test.
fn perftest_args(size: usize, n: usize, port: u16) -> Vec<String> {
    ["-R", "-s", &size.to_string(), "-n", &n.to_string()]
        .into_iter()
        .chain(["-p", &port.to_string()])
        .map(String::from)
        .collect()
}

/// Runs a perftest client against `host` (whose server is started by the caller or by
/// `--serve` there), retrying while the server is not up yet; its output.
fn perftest_client(tool: &str, args: &[String], host: &str) -> Result<String> {
    let mut last = String::new();
    // The emulated guest can be slow to bring the server up when the host is loaded.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1500));
        let out = Command::new(tool)
            .args(args)
            .arg(host)
            .output()
            .with_context(|| format!("running the {tool} client (is perftest installed?)"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(text);
        }
        last = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
    }
    bail!("{tool} client kept failing:\n{last}")
}

/// Runs a perftest pair on this host: the server without a host, then the client.
fn perftest_pair(tool: &str, args: &[String], host: &str) -> Result<String> {
    let mut server = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {tool} (is perftest installed?)"))?;
    let out = perftest_client(tool, args, host);
    if out.is_ok() {
        let _ = server.wait();
    } else {
        let _ = server.kill();
        let _ = server.wait();
    }
    out
}

/// The numbers of the first line of at least `want` numbers after perftest's header line
/// containing `marker`.
fn perftest_row(out: &str, marker: &str, want: usize) -> Result<Vec<f64>> {
    let mut lines = out.lines().skip_while(|l| !l.contains(marker));
    lines.next();
    for l in lines {
        let nums: Vec<f64> = l
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        if nums.len() >= want {
            return Ok(nums);
        }
    }
    bail!("no result row of {want} numbers after {marker:?} in perftest's output:\n{out}")
}

/// Starts a role and waits for its "listening on" line (the roles print it once they
/// accept connections); its output is drained afterwards so it never blocks on a pipe.
fn start_role(mut cmd: Command, what: &str) -> Result<Child> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("{what}'s stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("listening on") => break,
            Some(Ok(_)) => {}
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{what} exited before listening");
            }
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Ok(child)
}

fn start_server(args: &Args, plan: &Plan, port: u16, m: Mode) -> Result<Child> {
    let mut cmd = Command::new(plan.bin_dir.join("rdma_server"));
    cmd.args(["--bind-address", &args.host, "-p", &port.to_string()])
        .args(["-i", "0", "--no-pin", "--poll-mode", m.server_poll])
        .args(["--fast-path", if m.fast { "on" } else { "off" }])
        .arg("--engine-file")
        .arg(&args.engine_file);
    start_role(cmd, &format!("rdma_server ({})", m.name))
}

fn start_proxy(args: &Args, plan: &Plan, target: u16, m: Mode, forwarder: &str) -> Result<Child> {
    let mut cmd = Command::new(plan.bin_dir.join("rdma_proxy"));
    let port = args.port + PROXY_PORT_OFFSET;
    cmd.args(["--bind-address", &args.host, "-p", &port.to_string()])
        .args(["--server-address", &args.host])
        .args(["--target-port", &target.to_string()])
        .args(["--poll-mode", &args.proxy_poll_mode])
        .args(["--forwarder", forwarder])
        .args(["--fast-path", if m.fast { "on" } else { "off" }]);
    start_role(cmd, &format!("rdma_proxy (forwarder {forwarder})"))
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Connects a client of configuration `m`, retrying for a while (on two hosts the server
/// side may still be starting); checks that the fast path was granted where asked for.
fn connect(host: &str, port: u16, m: Mode, id: u32, slot: usize, depth: u32) -> Result<RdmaClient> {
    let cfg = RdmaClientConfig {
        client_id: id,
        slot_size: slot.div_ceil(4096) as u32 * 4096,
        depth,
        timeout: Duration::from_secs(20),
        mode: m.client,
        total_clients: 1,
        fast_path: m.fast,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let c = loop {
        match RdmaClient::connect(host, port, cfg.clone()) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("connecting to {host}:{port}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    if c.fast_path() != m.fast {
        bail!(
            "{host}:{port} ({}): fast path {} where {} was asked for",
            m.name,
            if c.fast_path() { "granted" } else { "refused" },
            if m.fast { "it" } else { "none" }
        );
    }
    Ok(c)
}

/// Closed-loop echo of `size`-byte requests (header included) to `port`, one in flight, every
/// round trip timed: the RTTs in µs.
fn ping(args: &Args, port: u16, m: Mode, size: usize, n: usize) -> Result<Vec<f64>> {
    let payload = size - HEADER_LEN;
    let mut c = connect(&args.host, port, m, 98, size + FAST_WORD_LEN, 1)?;
    // The payload once: the slot keeps it, each request rewrites only its header.
    for (i, b) in c.next_send_slot()?[HEADER_LEN..size].iter_mut().enumerate() {
        *b = i as u8;
    }
    let want = HEADER_LEN + RESPONSE_BODY_LEN + payload;
    let mut rtts = Vec::with_capacity(n);
    for id in 0..(args.warmup + n) as u64 {
        let mut head = [0u8; HEADER_LEN];
        Header::request(Task::Echo, 98, id, payload).encode(&mut head);
        c.next_send_slot().context("ping send slot")?[..HEADER_LEN].copy_from_slice(&head);
        let t = Instant::now();
        c.send_prepared(size).context("ping send")?;
        let reply = c.recv().context("ping receive")?;
        let rtt = t.elapsed();
        if reply.len() != want || reply[16..24] != id.to_le_bytes() {
            bail!("ping: a reply of {} bytes, {want} expected", reply.len());
        }
        if id >= args.warmup as u64 {
            rtts.push(rtt.as_secs_f64() * 1e6);
        }
    }
    Ok(rtts)
}

/// Pipelined stream to `port`, `--depth` in flight: (MiB/s of request payload, req/s). `task`
/// is Echo (the replies carry the payload back) or Sink (one way). Each request is built in
/// place in its send slot (the payload written once per slot, then only the header), as an
/// application producing its data into registered memory would.
fn stream(args: &Args, port: u16, m: Mode, task: Task) -> Result<(f64, f64)> {
    let payload = args.bw_size;
    let len = HEADER_LEN + payload;
    let mut c = connect(&args.host, port, m, 99, len + FAST_WORD_LEN, args.depth)?;
    let want = HEADER_LEN + RESPONSE_BODY_LEN + if task == Task::Echo { payload } else { 0 };
    let mut filled = 0u32;
    let total = args.warmup + args.iterations;
    let (mut sent, mut got) = (0usize, 0usize);
    let mut start = Instant::now();
    while got < total {
        while sent < total && c.can_send() {
            let mut head = [0u8; HEADER_LEN];
            Header::request(task, 99, sent as u64, payload).encode(&mut head);
            let slot = c.next_send_slot().context("stream send slot")?;
            if filled < args.depth {
                for (i, b) in slot[HEADER_LEN..len].iter_mut().enumerate() {
                    *b = i as u8;
                }
                filled += 1;
            }
            slot[..HEADER_LEN].copy_from_slice(&head);
            c.send_prepared(len).context("stream send")?;
            sent += 1;
        }
        let reply = c.recv().context("stream receive")?;
        if reply.len() != want || reply[6] != MessageKind::Response as u8 {
            bail!(
                "stream: reply of {} bytes (kind {}), a {want}-byte response expected",
                reply.len(),
                reply.get(6).copied().unwrap_or(0)
            );
        }
        got += 1;
        if got == args.warmup {
            start = Instant::now();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = args.iterations as f64;
    Ok((n * payload as f64 / secs / (1 << 20) as f64, n / secs))
}

/// A perftest server restarted after every run (two hosts: the peer runs its clients), until
/// the stop flag; the pid of the one running now, for the stop.
fn perftest_server_loop(tool: &'static str, args: Vec<String>) -> Arc<AtomicU32> {
    let pid = Arc::new(AtomicU32::new(0));
    let current = Arc::clone(&pid);
    std::thread::spawn(move || {
        while !signal::stop_requested() {
            let child = Command::new(tool)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let Ok(mut child) = child else {
                eprintln!("bench_rdma: cannot start {tool} (is perftest installed?)");
                return;
            };
            current.store(child.id(), Ordering::Relaxed);
            let _ = child.wait();
        }
    });
    pid
}

/// `--serve`: the server side of a two-host run, until SIGTERM.
fn serve(args: &Args, plan: &Plan) -> Result<()> {
    signal::install_stop_handler();
    let mut roles = Vec::new();
    for (i, m) in plan.modes.iter().enumerate() {
        roles.push(start_server(args, plan, args.port + i as u16, *m)?);
    }
    if let Some((i, m)) = plan.proxy {
        let forwarder = plan.proxy_forwarders.first().map_or("auto", |f| f.as_str());
        roles.push(start_proxy(args, plan, args.port + i as u16, m, forwarder)?);
    }
    let mut loops = Vec::new();
    if !args.no_perftest {
        for (i, &size) in plan.sizes.iter().enumerate() {
            let n = Plan::iterations(args, size);
            let port = args.perftest_port + i as u16;
            loops.push(perftest_server_loop(
                "ib_write_lat",
                perftest_args(size, n, port),
            ));
        }
        let port = args.perftest_port + BW_PORT_OFFSET;
        let bw = perftest_args(args.bw_size, args.iterations, port);
        loops.push(perftest_server_loop("ib_write_bw", bw));
    }
    println!(
        "bench_rdma serving on {}: {} rdma_server(s) from port {}, perftest from port {}",
        args.host,
        plan.modes.len(),
        args.port,
        args.perftest_port
    );
    std::io::stdout().flush()?;
    while !signal::stop_requested() {
        std::thread::sleep(Duration::from_millis(100));
    }
    // A loop may have started its next server after the first kill: kill twice.
    for _ in 0..2 {
        for pid in &loops {
            let pid = pid.load(Ordering::Relaxed);
            if pid != 0 {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for r in &mut roles {
        stop(r);
    }
    Ok(())
}

/// Everything one run measured.
struct Measured {
    /// Per size: ib_write_lat's row.
    perftest_lat: Vec<Option<Lat>>,
    /// Per configuration, per size: our round trips (RTT, not halved).
    lat: Vec<Vec<Lat>>,
    perftest_bw: Option<Bw>,
    /// Per configuration: the sink (one-way) and echo streams.
    one_way: Vec<Bw>,
    echo: Vec<Bw>,
    /// Per forwarder placement, per proxy size: (direct, through rdma_proxy) round trips.
    proxy: Vec<(String, Vec<(Lat, Lat)>)>,
}

fn measure(args: &Args, plan: &Plan) -> Result<Measured> {
    let perftest = |tool: &str, size: usize, n: usize, port: u16| -> Result<String> {
        let a = perftest_args(size, n, port);
        if args.peer {
            perftest_client(tool, &a, &args.host)
        } else {
            perftest_pair(tool, &a, &args.host)
        }
    };
    let mut perftest_lat = vec![None; plan.sizes.len()];
    let mut perftest_bw = None;
    if !args.no_perftest {
        for (i, &size) in plan.sizes.iter().enumerate() {
            let n = Plan::iterations(args, size);
            let out = perftest("ib_write_lat", size, n, args.perftest_port + i as u16)?;
            perftest_lat[i] = Some(Lat::from_perftest(&perftest_row(&out, "t_typical", 9)?));
        }
        let port = args.perftest_port + BW_PORT_OFFSET;
        let out = perftest("ib_write_bw", args.bw_size, args.iterations, port)?;
        perftest_bw = Some(Bw::from_perftest(&perftest_row(&out, "BW average", 5)?));
    }
    let bw = |(mibs, rate): (f64, f64)| Bw {
        bytes: args.bw_size,
        iterations: args.iterations,
        peak: None,
        avg: mibs,
        msg_rate: Some(rate),
    };
    let mut m = Measured {
        perftest_lat,
        lat: Vec::new(),
        perftest_bw,
        one_way: Vec::new(),
        echo: Vec::new(),
        proxy: Vec::new(),
    };
    for (i, &mode) in plan.modes.iter().enumerate() {
        let port = args.port + i as u16;
        let mut server = match args.peer {
            true => None,
            false => Some(start_server(args, plan, port, mode)?),
        };
        let run = (|| -> Result<()> {
            let mut rows = Vec::new();
            for &size in &plan.sizes {
                let n = Plan::iterations(args, size);
                rows.push(Lat::of(size, n, ping(args, port, mode, size, n)?)?);
            }
            m.lat.push(rows);
            m.one_way.push(bw(stream(args, port, mode, Task::Sink)?));
            m.echo.push(bw(stream(args, port, mode, Task::Echo)?));
            if plan.proxy.map(|(p, _)| p) == Some(i) {
                // Direct first, before the proxy runs: on a host with few cores its polling
                // threads would slow the direct rows too.
                let mut direct = Vec::new();
                for &size in &plan.proxy_sizes {
                    let n = Plan::iterations(args, size);
                    direct.push(Lat::of(size, n, ping(args, port, mode, size, n)?)?);
                }
                // With --peer the other host runs the one proxy (the first placement).
                let forwarders = match args.peer {
                    true => &plan.proxy_forwarders[..1],
                    false => &plan.proxy_forwarders[..],
                };
                for forwarder in forwarders {
                    let mut proxy = match args.peer {
                        true => None,
                        false => Some(start_proxy(args, plan, port, mode, forwarder)?),
                    };
                    let via_port = args.port + PROXY_PORT_OFFSET;
                    let rows = (|| -> Result<Vec<(Lat, Lat)>> {
                        let mut rows = Vec::new();
                        for (&size, direct) in plan.proxy_sizes.iter().zip(&direct) {
                            let n = Plan::iterations(args, size);
                            let via = Lat::of(size, n, ping(args, via_port, mode, size, n)?)?;
                            rows.push((*direct, via));
                        }
                        Ok(rows)
                    })();
                    if let Some(p) = proxy.as_mut() {
                        stop(p);
                    }
                    let rows = rows.with_context(|| format!("through rdma_proxy ({forwarder})"))?;
                    m.proxy.push((forwarder.clone(), rows));
                }
            }
            Ok(())
        })();
        if let Some(s) = server.as_mut() {
            stop(s);
        }
        run.with_context(|| format!("configuration {}", mode.name))?;
    }
    Ok(m)
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    if args.serve && args.peer {
        bail!("--serve and --peer are the two sides of one run: give one");
    }
    let plan = Plan::new(&args)?;
    if args.serve {
        return serve(&args, &plan);
    }
    let m = measure(&args, &plan)?;
    let table = Table::new(&args, &plan, &m);
    table.print();
    if let Some(path) = &args.csv {
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if new {
            writeln!(
                f,
                "label,section,row,bytes,iterations,p50_us,p99_us,avg_us,mib_s,ratio"
            )?;
        }
        for r in &table.csv {
            writeln!(f, "{},{r}", args.label)?;
        }
    }
    Ok(())
}

/// Width of the row names' column.
const NAME_W: usize = 30;
/// perftest's latency and bandwidth columns, each as wide as its header plus two.
const LAT_COLS: [&str; 11] = [
    "#bytes",
    "#iterations",
    "t_min[usec]",
    "t_max[usec]",
    "t_typical[usec]",
    "t_avg[usec]",
    "t_stdev[usec]",
    "99% percentile[usec]",
    "99.9% percentile[usec]",
    "ratio typical",
    "ratio avg",
];
const BW_COLS: [&str; 6] = [
    "#bytes",
    "#iterations",
    "BW peak[MB/sec]",
    "BW average[MB/sec]",
    "MsgRate[Mpps]",
    "ratio",
];

/// A figure with `decimals`, or `-` where there is none.
fn num(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".to_string(),
    }
}

fn ratio(a: f64, b: Option<f64>) -> Option<f64> {
    b.filter(|&b| b > 0.0).map(|b| a / b)
}

/// A row: its name, then each cell right-aligned in its column (missing cells are `-`).
fn row_text(name: &str, cols: &[&str], cells: &[String]) -> String {
    let mut s = format!(" {name:<NAME_W$}");
    for (i, c) in cols.iter().enumerate() {
        let v = cells.get(i).map_or("-", String::as_str);
        s += &format!("{v:>w$}", w = c.len() + 2);
    }
    s
}

/// The one table (perftest's rows, the reference of each ratio, and ours) as lines, and the
/// same rows for the CSV.
struct Table {
    lines: Vec<String>,
    csv: Vec<String>,
}

impl Table {
    fn new(args: &Args, plan: &Plan, m: &Measured) -> Table {
        let mut t = Table {
            lines: Vec::new(),
            csv: Vec::new(),
        };
        let width = 1 + NAME_W + LAT_COLS.iter().map(|c| c.len() + 2).sum::<usize>();
        let rule = "-".repeat(width);
        t.lines.push(rule.clone());
        let side = if args.peer {
            "two hosts, server side on"
        } else {
            "one host,"
        };
        t.lines.push(format!(
            " bench_rdma, {side} {} ({} iterations, {} from {} KiB; {} warmup); RTT/2 = half the round trip, as perftest",
            args.host,
            args.iterations,
            args.big_iterations,
            BIG_SIZE >> 10,
            args.warmup
        ));
        t.lines.push(rule.clone());
        t.header(&LAT_COLS);
        for s in 0..plan.sizes.len() {
            let reference = m.perftest_lat[s];
            t.lat_row("latency", "ib_write_lat (perftest)", reference, None);
            for (i, mode) in plan.modes.iter().enumerate() {
                let name = format!("{} echo RTT/2", mode.name);
                t.lat_row("latency", &name, Some(m.lat[i][s].scaled(0.5)), reference);
            }
            if s + 1 < plan.sizes.len() {
                t.lines.push(String::new());
            }
        }
        t.lines.push(rule.clone());
        t.header(&BW_COLS);
        t.bw_row("ib_write_bw (perftest)", m.perftest_bw, None);
        let reference = m.perftest_bw.map(|b| b.avg);
        for (i, mode) in plan.modes.iter().enumerate() {
            let name = format!("{} one-way, depth {}", mode.name, args.depth);
            t.bw_row(&name, Some(m.one_way[i]), reference);
            let name = format!("{} echo, depth {}", mode.name, args.depth);
            t.bw_row(&name, Some(m.echo[i]), reference);
        }
        if let Some((_, mode)) = plan.proxy {
            t.lines.push(rule.clone());
            t.header(&LAT_COLS);
            for (forwarder, rows) in &m.proxy {
                for (direct, via) in rows {
                    let (direct, via) = (direct.scaled(0.5), via.scaled(0.5));
                    t.lat_row(
                        "proxy",
                        &format!("{} direct RTT/2", mode.name),
                        Some(direct),
                        None,
                    );
                    let name = format!("via rdma_proxy ({forwarder}) RTT/2");
                    t.lat_row("proxy", &name, Some(via), Some(direct));
                    let added = Lat {
                        min: f64::NAN,
                        max: f64::NAN,
                        typical: via.typical - direct.typical,
                        avg: via.avg - direct.avg,
                        stdev: f64::NAN,
                        p99: via.p99 - direct.p99,
                        p999: f64::NAN,
                        ..via
                    };
                    let name = format!("proxy ({forwarder}) added RTT/2");
                    t.lat_row("proxy", &name, Some(added), Some(direct));
                }
            }
        }
        t.lines.push(rule.clone());
        t.goals(plan, m);
        t.lines.push(rule);
        t
    }

    fn print(&self) {
        for l in &self.lines {
            println!("{l}");
        }
    }

    fn header(&mut self, cols: &[&str]) {
        let names: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
        self.lines.push(row_text("", cols, &names));
    }

    /// A latency row; `against`: perftest's row (or the direct one) for the ratio columns.
    fn lat_row(&mut self, section: &str, name: &str, row: Option<Lat>, against: Option<Lat>) {
        let Some(r) = row else {
            self.lines.push(row_text(name, &LAT_COLS, &[]));
            return;
        };
        let mut c = vec![r.bytes.to_string(), r.iterations.to_string()];
        let figures = [r.min, r.max, r.typical, r.avg, r.stdev, r.p99, r.p999];
        c.extend(figures.map(|v| num(Some(v), 2)));
        let typical = ratio(r.typical, against.map(|p| p.typical));
        c.push(num(typical, 2));
        c.push(num(ratio(r.avg, against.map(|p| p.avg)), 2));
        self.lines.push(row_text(name, &LAT_COLS, &c));
        self.csv.push(format!(
            "{section},{name},{},{},{:.3},{:.3},{:.3},,{}",
            r.bytes,
            r.iterations,
            r.typical,
            r.p99,
            r.avg,
            typical.map_or(String::new(), |v| format!("{v:.3}"))
        ));
    }

    fn bw_row(&mut self, name: &str, row: Option<Bw>, against: Option<f64>) {
        let Some(r) = row else {
            self.lines.push(row_text(name, &BW_COLS, &[]));
            return;
        };
        let q = ratio(r.avg, against);
        let cells = vec![
            r.bytes.to_string(),
            r.iterations.to_string(),
            num(r.peak, 2),
            num(Some(r.avg), 2),
            num(r.msg_rate.map(|m| m / 1e6), 6),
            num(q, 2),
        ];
        self.lines.push(row_text(name, &BW_COLS, &cells));
        self.csv.push(format!(
            "bandwidth,{name},{},{},,,,{:.2},{}",
            r.bytes,
            r.iterations,
            r.avg,
            q.map_or(String::new(), |v| format!("{v:.3}"))
        ));
    }

    /// The issue's goals, each with its verdict from this run's figures.
    fn goals(&mut self, plan: &Plan, m: &Measured) {
        let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
        if let Some(p) = m.perftest_lat.first().copied().flatten() {
            for (i, mode) in plan.modes.iter().enumerate() {
                let ours = m.lat[i][0].scaled(0.5);
                let q = ours.typical / p.typical;
                self.lines.push(format!(
                    " goal {} B p50 RTT/2 <= 1.05x ib_write_lat: {:<6} {:.2} vs {:.2} us = {q:.2}x  {}",
                    p.bytes,
                    mode.name,
                    ours.typical,
                    p.typical,
                    verdict(q <= 1.05)
                ));
            }
        }
        if let Some(p) = m.perftest_bw {
            for (i, mode) in plan.modes.iter().enumerate() {
                let q = m.one_way[i].avg / p.avg;
                self.lines.push(format!(
                    " goal one-way stream >= 0.95x ib_write_bw: {:<6} {:.0} vs {:.0} MB/sec = {q:.2}x  {}",
                    mode.name,
                    m.one_way[i].avg,
                    p.avg,
                    verdict(q >= 0.95)
                ));
            }
        }
        for (direct, via, forwarder) in m
            .proxy
            .iter()
            .flat_map(|(f, rows)| rows.iter().map(move |(d, v)| (d, v, f)))
        {
            let (d, v) = (direct.scaled(0.5), via.scaled(0.5));
            let added = v.typical - d.typical;
            self.lines.push(format!(
                " goal proxy adds <= one hop's RTT/2: {forwarder:<6} {} B added {added:.2} us vs direct {:.2} us  {}",
                d.bytes,
                d.typical,
                verdict(added <= d.typical)
            ));
        }
        self.lines.push(format!(
            " fast: requests and replies of at most {FAST_MAX_LEN} B as one plain WRITE polled by its last word; larger sizes use WRITE_WITH_IMM"
        ));
        self.lines.push(
            " ours: an echo's reply is the request's payload plus the 128-byte header and response body; perftest's is the same size both ways".to_string(),
        );
    }
}

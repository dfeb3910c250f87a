//! bench_rdma: our RDMA path against perftest, measured in the same run on the same device.
//!
//! Runs inside the Soft-RoCE VM (or on any host with an RDMA device and perftest):
//!
//! ```text
//! tests/testbed/run-in-vm.sh target/release/bench_rdma
//! ```
//!
//! 1. `ib_write_lat -R -s 64 -n N` (server and client on --host) and `rdma_client` echo of a
//!    64-byte request (header included) against `rdma_server`, both busy-polling, with warmup.
//!    perftest reports half the ping-pong round trip (RTT/2); rdma_client reports the full
//!    round trip, so the latency ratio compares our RTT/2 with perftest's.
//! 2. `ib_write_bw -R -s 150528 -n N` (streaming, 128 writes in flight) against (a) rdma_client
//!    echo of 150,528-byte payloads, closed loop (one in flight), and (b) a pipelined echo
//!    stream from this process (`--depth` requests in flight on one RdmaClient). MB/s counts
//!    the request bytes of one direction, in perftest's unit (MiB/s, 2^20); an echo moves the
//!    same bytes back as well, which perftest's one-way stream does not; (c) the same stream
//!    of sink requests (task 4: the payload is discarded, the reply is 128 bytes), the
//!    one-way figure to compare with ib_write_bw.
//!
//! It prints one table in perftest's columns: a latency section (perftest's row, then ours
//! as RTT/2 and as the full RTT; ours from every request's round trip in rdma_client's CSV)
//! and a bandwidth section (`BW average[MB/sec]`, `MsgRate[Mpps]`), each of our rows with its
//! ratio to perftest's row of the same section.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::protocol::{Header, MessageKind, Task, HEADER_LEN, RESPONSE_BODY_LEN};
use hacserve_runtime::stats::read_csv;
use hacserve_runtime::transport::rdma::{RdmaClient, RdmaClientConfig, DEFAULT_PORT};

#[derive(FromArgs)]
/// RDMA benchmark: perftest (ib_write_lat / ib_write_bw) vs rdma_server + rdma_client.
struct Args {
    /// address of the RDMA device to use (server and clients)
    #[argh(option, default = "String::from(\"192.0.2.1\")")]
    host: String,
    /// rdma_server port
    #[argh(option, default = "DEFAULT_PORT")]
    port: u16,
    /// iterations (perftest -n) and measured requests
    #[argh(option, short = 'n', default = "2000")]
    iterations: usize,
    /// unmeasured requests before our measurements
    #[argh(option, default = "200")]
    warmup: usize,
    /// latency test message size in bytes (our request: header + payload = this)
    #[argh(option, default = "64")]
    lat_size: usize,
    /// bandwidth test message size in bytes (our echo payload)
    #[argh(option, default = "150528")]
    bw_size: usize,
    /// requests in flight for the pipelined stream
    #[argh(option, default = "16")]
    depth: u32,
    /// rdma_server poll mode (hybrid: its receive loop spins, its worker sleeps until a
    /// request is queued; busy: both spin)
    #[argh(option, default = "String::from(\"hybrid\")")]
    server_poll_mode: String,
    /// model file for rdma_server (echo never runs it; a small one starts fast)
    #[argh(option, default = "PathBuf::from(\"models/resnet_tiny.onnx\")")]
    engine_file: PathBuf,
    /// directory holding rdma_server and rdma_client (default: next to this binary)
    #[argh(option)]
    bin_dir: Option<PathBuf>,
    /// skip perftest (only our figures)
    #[argh(switch)]
    no_perftest: bool,
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

    /// Order statistics of `us` (nearest rank, as the client's table); `avg` when the mean
    /// is measured apart from the samples (the in-process echo's total over its count).
    fn of(bytes: usize, iterations: usize, mut us: Vec<f64>, avg: Option<f64>) -> Result<Lat> {
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
            avg: avg.unwrap_or(mean),
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

/// Runs a perftest pair: the server without a host, then the client against `host`.
fn perftest(tool: &str, size: usize, n: usize, host: &str) -> Result<String> {
    let args = ["-R", "-s", &size.to_string(), "-n", &n.to_string()];
    let mut server = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {tool} (is perftest installed?)"))?;
    // The server must be listening before the client connects; retry a few times.
    let mut last = String::new();
    // The emulated guest can be slow to bring the server up when the host is loaded.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1500));
        let out = Command::new(tool)
            .args(args)
            .arg(host)
            .output()
            .with_context(|| format!("running the {tool} client"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            let _ = server.wait();
            return Ok(text);
        }
        last = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = server.kill();
    let _ = server.wait();
    bail!("{tool} client kept failing:\n{last}")
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

fn start_server(args: &Args, bin_dir: &Path, port: u16, extra: &[&str]) -> Result<Child> {
    let mut child = Command::new(bin_dir.join("rdma_server"))
        .args(["--bind-address", &args.host, "-p", &port.to_string()])
        .args(extra)
        .args(["-i", "0", "--no-pin", "--poll-mode", &args.server_poll_mode])
        .arg("--engine-file")
        .arg(&args.engine_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting rdma_server")?;
    let stdout = child.stdout.take().context("rdma_server's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("listening on") => break,
            Some(Ok(_)) => {}
            _ => {
                let _ = child.kill();
                bail!("rdma_server exited before listening");
            }
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok(child)
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Our closed-loop client, echo of `payload` bytes: its per-request round trips (µs, from
/// the CSV it writes with -s) and its req/s.
fn rdma_client(args: &Args, bin_dir: &Path, payload: usize, n: usize) -> Result<(Vec<f64>, f64)> {
    let slot = (HEADER_LEN + payload).div_ceil(4096) * 4096;
    let logs = std::env::temp_dir().join(format!("bench_rdma_{}", std::process::id()));
    let out = Command::new(bin_dir.join("rdma_client"))
        .args(["--host", &args.host, "-p", &args.port.to_string()])
        .args(["-t", "echo", "--payload-size", &payload.to_string()])
        .args(["-r", &n.to_string(), "--warmup", &args.warmup.to_string()])
        .args(["--poll-mode", "busy", "--slot-size", &slot.to_string()])
        .args(["--client-id", "97", "-s", "-f"])
        .arg(&logs)
        .output()
        .context("running rdma_client")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains(" 0 errors") {
        bail!(
            "rdma_client failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rate = text
        .lines()
        .find_map(|l| l.strip_suffix(" req/s"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|t| t.parse().ok())
        .context("no req/s figure")?;
    let csv = logs.join("client_97.csv");
    let records = read_csv(&csv).with_context(|| format!("reading {}", csv.display()));
    let _ = std::fs::remove_dir_all(&logs);
    let rtts: Vec<f64> = records?
        .iter()
        .filter(|r| r.status == 0)
        .map(|r| r.e2e_ns as f64 / 1e3)
        .collect();
    Ok((rtts, rate))
}

/// Pipelined stream from this process to `port`: (MiB/s of request payload, req/s). `task` is
/// Echo (the replies carry the payload back) or Sink (one way: the payload is discarded and
/// the replies are header + response body). Each request is built in place in its send slot
/// (the payload written once per slot, then only the header), as an application producing
/// its data into registered memory would.
fn stream(args: &Args, port: u16, task: Task) -> Result<(f64, f64)> {
    let payload = args.bw_size;
    let slot = ((HEADER_LEN + payload).div_ceil(4096) * 4096) as u32;
    let mut c = RdmaClient::connect(
        &args.host,
        port,
        RdmaClientConfig {
            client_id: 99,
            slot_size: slot,
            depth: args.depth,
            timeout: Duration::from_secs(20),
            mode: PollMode::Busy,
            total_clients: 1,
            fast_path: false,
        },
    )
    .context("connecting the stream client")?;
    let len = HEADER_LEN + payload;
    let want = HEADER_LEN + RESPONSE_BODY_LEN + if task == Task::Echo { payload } else { 0 };
    let mut filled = 0u32;
    let total = args.warmup + args.iterations;
    let (mut sent, mut got) = (0usize, 0usize);
    let mut start = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < total {
        while sent < total && c.can_send() {
            let mut head = [0u8; HEADER_LEN];
            Header::request(task, 99, sent as u64, payload).encode(&mut head);
            let slot = c.next_send_slot().context("stream send slot")?;
            if filled < args.depth {
                // First use of this slot: the payload, a byte pattern.
                for (i, b) in slot[HEADER_LEN..len].iter_mut().enumerate() {
                    *b = i as u8;
                }
                filled += 1;
            }
            slot[..HEADER_LEN].copy_from_slice(&head);
            c.send_prepared(len).context("stream send")?;
            sent += 1;
        }
        if let Some((_, reply)) = c.try_recv().context("stream receive")? {
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
        } else if Instant::now() > deadline {
            bail!("stream: no progress ({got} of {total} replies)");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = args.iterations as f64;
    Ok((n * payload as f64 / secs / (1 << 20) as f64, n / secs))
}

/// Round trips per timed batch in [`ping`].
const PING_BATCH: usize = 10;

/// Closed-loop echo of `args.lat_size`-byte requests from this process (one in flight), timed
/// per batch of [`PING_BATCH`] round trips instead of per request: rdma_client reads the
/// clock four times per request (its CSV timestamps), which costs ~2 us a read where the
/// clocksource is not the TSC (the emulated testbed: HPET), and perftest reads the TSC.
/// Returns the per-batch round trips and the mean round trip over the whole run, in µs.
fn ping(args: &Args, port: u16) -> Result<(Vec<f64>, f64)> {
    let len = args.lat_size;
    let payload = len - HEADER_LEN;
    let mut c = RdmaClient::connect(
        &args.host,
        port,
        RdmaClientConfig {
            client_id: 98,
            slot_size: len.div_ceil(4096) as u32 * 4096,
            depth: 1,
            timeout: Duration::from_secs(20),
            mode: PollMode::Busy,
            total_clients: 1,
            fast_path: false,
        },
    )
    .context("connecting the ping client")?;
    let want = HEADER_LEN + RESPONSE_BODY_LEN + payload;
    let mut one = |id: u64| -> Result<()> {
        let mut head = [0u8; HEADER_LEN];
        Header::request(Task::Echo, 98, id, payload).encode(&mut head);
        c.next_send_slot().context("ping send slot")?[..HEADER_LEN].copy_from_slice(&head);
        c.send_prepared(len).context("ping send")?;
        let mut spins = 0u32;
        loop {
            if let Some((_, reply)) = c.try_recv().context("ping receive")? {
                if reply.len() != want || reply[16..24] != id.to_le_bytes() {
                    bail!("ping: unexpected reply of {} bytes", reply.len());
                }
                return Ok(());
            }
            spins += 1;
            if spins == 1 << 26 {
                bail!("ping: no reply to request {id}");
            }
        }
    };
    for i in 0..args.warmup {
        one(i as u64)?;
    }
    let batches = (args.iterations / PING_BATCH).max(1);
    let mut per_rtt = Vec::with_capacity(batches);
    let start = Instant::now();
    for b in 0..batches {
        let t = Instant::now();
        for i in 0..PING_BATCH {
            one((args.warmup + b * PING_BATCH + i) as u64)?;
        }
        per_rtt.push(t.elapsed().as_secs_f64() * 1e6 / PING_BATCH as f64);
    }
    let mean = start.elapsed().as_secs_f64() * 1e6 / (batches * PING_BATCH) as f64;
    Ok((per_rtt, mean))
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("locating this binary")?
            .parent()
            .context("this binary's directory")?
            .to_path_buf(),
    };
    if args.lat_size <= HEADER_LEN {
        bail!("--lat-size must exceed the {HEADER_LEN}-byte header");
    }
    let n = args.iterations;
    let (mut lat, mut bw) = (None, None);
    if !args.no_perftest {
        let out = perftest("ib_write_lat", args.lat_size, n, &args.host)?;
        lat = Some(Lat::from_perftest(&perftest_row(&out, "t_typical", 9)?));
        let out = perftest("ib_write_bw", args.bw_size, n, &args.host)?;
        bw = Some(Bw::from_perftest(&perftest_row(&out, "BW average", 5)?));
    }
    let mut server = start_server(&args, &bin_dir, args.port, &[])?;
    let run = (|| -> Result<_> {
        let small = rdma_client(&args, &bin_dir, args.lat_size - HEADER_LEN, n)?;
        let pinged = ping(&args, args.port)?;
        let big = rdma_client(&args, &bin_dir, args.bw_size, n)?;
        let streamed = stream(&args, args.port, Task::Echo)?;
        // One direction only, like ib_write_bw: sink requests, 128-byte replies.
        let one_way = stream(&args, args.port, Task::Sink)?;
        Ok((small, pinged, big, streamed, one_way))
    })();
    stop(&mut server);
    let ((small, _), (batches, ping_mean), (_, big_rate), streamed, one_way) = run?;
    let client_rtt = Lat::of(args.lat_size, small.len(), small, None)?;
    let ping_rtt = Lat::of(
        args.lat_size,
        batches.len() * PING_BATCH,
        batches,
        Some(ping_mean),
    )?;
    let ours_bw = |(mibs, rate): (f64, f64)| Bw {
        bytes: args.bw_size,
        iterations: n,
        peak: None,
        avg: mibs,
        msg_rate: Some(rate),
    };
    let closed = ours_bw((big_rate * args.bw_size as f64 / (1 << 20) as f64, big_rate));
    let both_ways = Bw {
        avg: 2.0 * streamed.0,
        msg_rate: None,
        ..ours_bw(streamed)
    };
    let table = Table { lat, bw };
    let line = "-".repeat(table.width());
    println!("{line}");
    println!(
        " bench_rdma on {} ({} iterations, {} warmup, rdma_server poll {})",
        args.host, n, args.warmup, args.server_poll_mode
    );
    println!("{line}");
    Table::header(&Table::lat_cols());
    table.lat_row("ib_write_lat (perftest, RTT/2)", lat, false);
    table.lat_row("rdma_client echo RTT/2", Some(client_rtt.scaled(0.5)), true);
    table.lat_row("rdma_client echo RTT", Some(client_rtt), false);
    let in_process = format!("in-process echo RTT/2 (per {PING_BATCH})");
    table.lat_row(&in_process, Some(ping_rtt.scaled(0.5)), true);
    let in_process = format!("in-process echo RTT (per {PING_BATCH})");
    table.lat_row(&in_process, Some(ping_rtt), false);
    println!("{line}");
    Table::header(&Table::bw_cols());
    table.bw_row("ib_write_bw (perftest)", bw, false);
    table.bw_row("rdma_client echo, closed loop", Some(closed), true);
    let depth = args.depth;
    table.bw_row(
        &format!("echo stream, depth {depth}"),
        Some(ours_bw(streamed)),
        true,
    );
    table.bw_row(
        &format!("  both directions, depth {depth}"),
        Some(both_ways),
        false,
    );
    let name = format!("sink stream (one-way), depth {depth}");
    table.bw_row(&name, Some(ours_bw(one_way)), true);
    println!("{line}");
    println!(
        " ratio: our RTT/2 over ib_write_lat's (typical, avg; goal <= 1.10x), our MB/sec over ib_write_bw's (goal >= 0.90x)"
    );
    println!(
        " in-process rows: timed per {PING_BATCH} round trips, no client clock reads per request (like perftest's TSC); MB/sec = 2^20 bytes/s of request payload"
    );
    println!(
        " an echo carries each payload back too (both directions: twice the bytes); a sink's replies are 128 bytes"
    );
    println!("{line}");
    Ok(())
}

/// Width of the row names' column.
const NAME_W: usize = 36;
/// perftest's latency and bandwidth columns, each as wide as its header plus two.
const LAT_COLS: [&str; 9] = [
    "#bytes",
    "#iterations",
    "t_min[usec]",
    "t_max[usec]",
    "t_typical[usec]",
    "t_avg[usec]",
    "t_stdev[usec]",
    "99% percentile[usec]",
    "99.9% percentile[usec]",
];
const LAT_RATIOS: [&str; 2] = ["ratio typical", "ratio avg"];
const BW_COLS: [&str; 5] = [
    "#bytes",
    "#iterations",
    "BW peak[MB/sec]",
    "BW average[MB/sec]",
    "MsgRate[Mpps]",
];
const BW_RATIO: &str = "ratio";

/// The one table: perftest's rows (the reference of each ratio) and ours, side by side.
struct Table {
    lat: Option<Lat>,
    bw: Option<Bw>,
}

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

/// A row: its name, then each cell right-aligned in its column (blank cells are `-`).
fn print_row(name: &str, cols: &[&str], cells: &[String]) {
    let mut s = format!(" {name:<NAME_W$}");
    for (i, c) in cols.iter().enumerate() {
        let v = cells.get(i).map_or("-", String::as_str);
        s += &format!("{v:>w$}", w = c.len() + 2);
    }
    println!("{s}");
}

impl Table {
    fn width(&self) -> usize {
        let lat: usize = LAT_COLS
            .iter()
            .chain(&LAT_RATIOS)
            .map(|c| c.len() + 2)
            .sum();
        let bw: usize = BW_COLS.iter().chain([&BW_RATIO]).map(|c| c.len() + 2).sum();
        1 + NAME_W + lat.max(bw)
    }

    fn lat_cols() -> Vec<&'static str> {
        [&LAT_COLS[..], &LAT_RATIOS[..]].concat()
    }

    fn bw_cols() -> Vec<&'static str> {
        [&BW_COLS[..], &[BW_RATIO][..]].concat()
    }

    /// A section's header line: the column names in their columns.
    fn header(cols: &[&str]) {
        let names: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
        print_row("", cols, &names);
    }

    /// `compare`: fill the row's ratio columns against perftest's row.
    fn lat_row(&self, name: &str, row: Option<Lat>, compare: bool) {
        let cells = row.map_or_else(Vec::new, |r| {
            let mut c = vec![r.bytes.to_string(), r.iterations.to_string()];
            let figures = [r.min, r.max, r.typical, r.avg, r.stdev, r.p99, r.p999];
            c.extend(figures.map(|v| num(Some(v), 2)));
            let p = self.lat.filter(|_| compare);
            c.push(num(ratio(r.typical, p.map(|p| p.typical)), 2));
            c.push(num(ratio(r.avg, p.map(|p| p.avg)), 2));
            c
        });
        print_row(name, &Self::lat_cols(), &cells);
    }

    fn bw_row(&self, name: &str, row: Option<Bw>, compare: bool) {
        let cells = row.map_or_else(Vec::new, |r| {
            let against = self.bw.filter(|_| compare).map(|p| p.avg);
            vec![
                r.bytes.to_string(),
                r.iterations.to_string(),
                num(r.peak, 2),
                num(Some(r.avg), 2),
                num(r.msg_rate.map(|m| m / 1e6), 6),
                num(ratio(r.avg, against), 2),
            ]
        });
        print_row(name, &Self::bw_cols(), &cells);
    }
}

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

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::protocol::{Header, MessageKind, Task, HEADER_LEN, RESPONSE_BODY_LEN};
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

/// perftest's figures (µs, MiB/s).
#[derive(Debug, Default, Clone, Copy)]
struct Perf {
    typical: f64,
    avg: f64,
    bw_avg: f64,
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

/// The numbers of the line after perftest's header line containing `marker`.
fn perftest_row(out: &str, marker: &str) -> Result<Vec<f64>> {
    let mut lines = out.lines().skip_while(|l| !l.contains(marker));
    lines.next();
    for l in lines {
        let nums: Vec<f64> = l
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        if nums.len() >= 5 {
            return Ok(nums);
        }
    }
    bail!("no result row after {marker:?} in perftest's output:\n{out}")
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

/// Our closed-loop client's output: (p50 µs, mean µs, req/s).
fn rdma_client(args: &Args, bin_dir: &Path, payload: usize, n: usize) -> Result<(f64, f64, f64)> {
    let slot = (HEADER_LEN + payload).div_ceil(4096) * 4096;
    let out = Command::new(bin_dir.join("rdma_client"))
        .args(["--host", &args.host, "-p", &args.port.to_string()])
        .args(["-t", "3", "--payload-size", &payload.to_string()])
        .args(["-r", &n.to_string(), "--warmup", &args.warmup.to_string()])
        .args(["--poll-mode", "busy", "--slot-size", &slot.to_string()])
        .output()
        .context("running rdma_client")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains(" 0 errors") {
        bail!(
            "rdma_client failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let row: Vec<f64> = text
        .lines()
        .find(|l| l.trim_start().starts_with("end-to-end"))
        .context("no end-to-end row")?
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // count p50 p90 p99 p99.9 max mean
    if row.len() < 7 {
        bail!("short end-to-end row in:\n{text}");
    }
    let rate = text
        .lines()
        .find_map(|l| l.strip_suffix(" req/s"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|t| t.parse().ok())
        .context("no req/s figure")?;
    Ok((row[1], row[6], rate))
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
/// Returns (median, mean) round trip in µs.
fn ping(args: &Args, port: u16) -> Result<(f64, f64)> {
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
    per_rtt.sort_by(f64::total_cmp);
    Ok((per_rtt[per_rtt.len() / 2], mean))
}

fn main() -> Result<()> {
    let args: Args = argh::from_env();
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
    let (mut lat, mut bw) = (Perf::default(), Perf::default());
    if !args.no_perftest {
        let out = perftest("ib_write_lat", args.lat_size, n, &args.host)?;
        let row = perftest_row(&out, "t_typical")?;
        lat.typical = row[4];
        lat.avg = row[5];
        let out = perftest("ib_write_bw", args.bw_size, n, &args.host)?;
        let row = perftest_row(&out, "BW average")?;
        bw.bw_avg = row[3];
        println!(
            "perftest: ib_write_lat typical {:.2} us avg {:.2} us (RTT/2); ib_write_bw {:.1} MiB/s",
            lat.typical, lat.avg, bw.bw_avg
        );
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
    let (
        (p50, mean, _),
        (ping_p50, ping_mean),
        (_, _, big_rate),
        (stream_mibs, stream_rate),
        (oneway_mibs, oneway_rate),
    ) = run?;
    let closed_mibs = big_rate * args.bw_size as f64 / (1 << 20) as f64;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let line = "-".repeat(100);
    println!("{line}");
    println!(
        " bench_rdma on {} ({} iterations, {} warmup, rdma_server poll {})",
        args.host, n, args.warmup, args.server_poll_mode
    );
    println!("{line}");
    println!(
        " latency, {} B        ours RTT p50 {:>8.2} us  mean {:>8.2} us | RTT/2 p50 {:>7.2} mean {:>7.2} | ib_write_lat typical {:>7.2} avg {:>7.2} us",
        args.lat_size, p50, mean, p50 / 2.0, mean / 2.0, lat.typical, lat.avg
    );
    println!(
        " latency ratio        p50/typical {:.2}x  mean/avg {:.2}x   (goal <= 1.10x)",
        ratio(p50 / 2.0, lat.typical),
        ratio(mean / 2.0, lat.avg)
    );
    println!(
        " latency, {} B        in-process echo, timed per {PING_BATCH} round trips: RTT median {:>7.2} us mean {:>7.2} us | RTT/2 {:>7.2} mean {:>7.2}",
        args.lat_size, ping_p50, ping_mean, ping_p50 / 2.0, ping_mean / 2.0
    );
    println!(
        " latency ratio        in-process median/typical {:.2}x  mean/avg {:.2}x   (no client clock reads per request, like perftest's TSC)",
        ratio(ping_p50 / 2.0, lat.typical),
        ratio(ping_mean / 2.0, lat.avg)
    );
    println!(
        " bandwidth, {} B  closed loop {:>8.1} MiB/s ({:.0} req/s) | stream depth {} {:>8.1} MiB/s ({:.0} req/s) | ib_write_bw {:>8.1} MiB/s",
        args.bw_size, closed_mibs, big_rate, args.depth, stream_mibs, stream_rate, bw.bw_avg
    );
    println!(
        " bandwidth ratio      closed loop {:.2}x  stream {:.2}x   (goal >= 0.90x)",
        ratio(closed_mibs, bw.bw_avg),
        ratio(stream_mibs, bw.bw_avg)
    );
    println!(
        " (an echo carries each payload back too: both directions together move {:.1} MiB/s streamed)",
        2.0 * stream_mibs
    );
    println!(
        " one-way stream depth {} {:>8.1} MiB/s ({:.0} req/s), ratio {:.2}x vs ib_write_bw (sink task: 128-byte replies)",
        args.depth,
        oneway_mibs,
        oneway_rate,
        ratio(oneway_mibs, bw.bw_avg)
    );
    println!("{line}");
    Ok(())
}

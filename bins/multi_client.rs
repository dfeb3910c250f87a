//! multi_client: runs N client processes at once against one host and merges their
//! per-request logs into one summary per concurrency level (the original's multi-client.py,
//! `-m single|range`), or, with `--concurrency-range` / `--request-rate-range`, drives the
//! load itself from this process (perf_analyzer-style sweeps, bins/cli/load.rs).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use argh::FromArgs;
use hacserve::cli::load::LoadArgs;
use hacserve_runtime::logging;
use hacserve_runtime::protocol::Workload;
use hacserve_runtime::stats::{read_csv, Report};

#[derive(FromArgs)]
/// Running Multiple Clients: N concurrent client processes, merged latency summary.
struct Args {
    /// host address
    #[argh(option, default = "String::from(\"7.7.7.2\")")]
    host: String,
    /// host port
    #[argh(option, short = 'p', default = "5555")]
    port: u16,
    /// number of clients (in-process: ZeroMQ connections)
    #[argh(option, short = 'c', default = "1")]
    clients: usize,
    /// client application: zmq_client or rdma_client (a name next to this binary, on PATH,
    /// or a path)
    #[argh(option, short = 'a', default = "String::from(\"zmq_client\")")]
    application_name: String,
    /// task (passed to each client's -t; in-process: the task sent): 0|ping, 1|raw,
    /// 2|processed, 3|mixture, 4|jpeg, 5|preprocess, 6|echo, 7|sink
    #[argh(option, short = 't', from_str_fn(parse_task))]
    task: String,
    /// requests per client (process-per-client mode; in-process runs count windows)
    #[argh(option, short = 'r', default = "100")]
    requests: usize,
    /// keep each client's per-request CSV and output (always written, deleted otherwise)
    #[argh(switch, short = 's')]
    save_logs: bool,
    /// results folder
    #[argh(option, short = 'f', default = "PathBuf::from(\"results\")")]
    folder: PathBuf,
    /// debug mode
    #[argh(switch, short = 'd')]
    debug_mode: bool,
    /// execution mode: single (N clients) or range (1, 2, 4, ... up to N)
    #[argh(option, short = 'm', default = "String::from(\"single\")")]
    mode: String,
    /// model name
    #[argh(option, default = "String::from(\"resnet50\")")]
    model_name: String,
    /// image each client sends (default: the client's own default)
    #[argh(option, short = 'i')]
    image: Option<PathBuf>,
    /// unmeasured requests each client sends first (in-process: per level, before its
    /// first window)
    #[argh(option, default = "0")]
    warmup: usize,
    /// in-process closed loop: requests outstanding, start:end:step (-c connections share
    /// them, each up to --depth)
    #[argh(option)]
    concurrency_range: Option<String>,
    /// in-process open loop: requests per second, start:end:step
    #[argh(option)]
    request_rate_range: Option<String>,
    /// open loop arrivals: constant or poisson
    #[argh(option, default = "String::from(\"constant\")")]
    request_distribution: String,
    /// window length in ms (in-process; default 5000)
    #[argh(option, default = "5000")]
    measurement_interval: u64,
    /// windows of this many finished requests instead of --measurement-interval
    #[argh(option)]
    measurement_request_count: Option<u64>,
    /// a level is stable when the last three windows' throughput and mean latency are each
    /// within this many percent (max/min); default 10
    #[argh(option, default = "10.0")]
    stability_percentage: f64,
    /// windows measured per level at most; a level not stable by then is reported UNSTABLE
    #[argh(option, default = "10")]
    max_trials: usize,
    /// in-process: requests in flight per connection at most (default 64)
    #[argh(option, default = "64")]
    depth: usize,
    /// in-process: sending threads, each pinned, sharing the connections (default 1)
    #[argh(option, default = "1")]
    threads: usize,
    /// in-process: a request unanswered this long counts as no-reply, in ms
    #[argh(option, default = "30000")]
    timeout_ms: u64,
    /// in-process: busy (spin) or block (poll) while waiting
    #[argh(option, default = "String::from(\"block\")")]
    poll_mode: String,
    /// echo and sink tasks: send this many zero bytes instead of the image
    #[argh(option)]
    payload_size: Option<usize>,
    /// in-process: the measured server's pid on this host, for its CPU-seconds per 1000
    /// requests beside the load generator's
    #[argh(option)]
    server_pid: Option<u32>,
    /// in-process: do not pin the sending threads
    #[argh(switch)]
    no_pin: bool,
    /// in-process: the core the first sending thread is pinned to (the next ones follow);
    /// on the server's host, keep them off the server's pinned cores (its receive loop
    /// takes core 0)
    #[argh(option, default = "0")]
    first_core: usize,
    /// in-process with -s: per-request rows kept (all levels; default 200000)
    #[argh(option, default = "200000")]
    log_capacity: usize,
    /// in-process with -s: resources.csv sample period in ms (default 20)
    #[argh(option, default = "20")]
    sample_ms: u64,
}

/// `-t`, checked here so that a bad task fails once, not in every client.
fn parse_task(s: &str) -> Result<String, String> {
    Workload::parse(s).map(|_| s.to_string())
}

/// Concurrency levels for a mode: `single` -> [n]; `range` -> 1, 2, 4, ... and n itself.
fn levels(mode: &str, n: usize) -> Result<Vec<usize>> {
    match mode {
        "single" => Ok(vec![n]),
        "range" => {
            let mut v: Vec<usize> = std::iter::successors(Some(1usize), |x| Some(x * 2))
                .take_while(|&x| x < n)
                .collect();
            v.push(n);
            Ok(v)
        }
        other => bail!("-m must be single or range, not {other:?}"),
    }
}

impl Args {
    fn load_args(&self) -> LoadArgs {
        LoadArgs {
            host: self.host.clone(),
            port: self.port,
            connections: self.clients,
            application: self.application_name.clone(),
            task: self.task.clone(),
            save_logs: self.save_logs,
            folder: self.folder.clone(),
            model_name: self.model_name.clone(),
            image: self.image.clone(),
            warmup: self.warmup as u64,
            concurrency_range: self.concurrency_range.clone(),
            request_rate_range: self.request_rate_range.clone(),
            request_distribution: self.request_distribution.clone(),
            measurement_interval_ms: self.measurement_interval,
            measurement_request_count: self.measurement_request_count,
            stability_percentage: self.stability_percentage,
            max_trials: self.max_trials,
            depth: self.depth,
            threads: self.threads,
            timeout_ms: self.timeout_ms,
            poll_mode: self.poll_mode.clone(),
            payload_size: self.payload_size,
            server_pid: self.server_pid,
            pin: !self.no_pin,
            first_core: self.first_core,
            log_capacity: self.log_capacity,
            sample_ms: self.sample_ms,
        }
    }
}

fn resolve_application(name: &str) -> PathBuf {
    if name.contains('/') {
        return PathBuf::from(name);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        let beside = dir.join(name);
        if beside.is_file() {
            return beside;
        }
    }
    PathBuf::from(name)
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    logging::init(args.debug_mode);
    if args.clients == 0 {
        bail!("-c must be at least 1");
    }
    if args.concurrency_range.is_some() || args.request_rate_range.is_some() {
        if args.mode != "single" {
            bail!("-m {} is the process-per-client mode; the in-process ranges (--concurrency-range, --request-rate-range) replace it", args.mode);
        }
        return hacserve::cli::load::run(&args.load_args());
    }
    let app = resolve_application(&args.application_name);
    let mut summary = Vec::new();
    for n in levels(&args.mode, args.clients)? {
        let folder = args.folder.join(format!("clients_{n}"));
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("creating {}", folder.display()))?;
        let started = Instant::now();
        let mut children = Vec::with_capacity(n);
        for id in 0..n {
            let out = std::fs::File::create(folder.join(format!("client_{id}.out")))
                .context("creating a client output file")?;
            let mut cmd = Command::new(&app);
            cmd.args(["--host", &args.host])
                .args(["--port", &args.port.to_string()])
                .args(["-t", &args.task])
                .args(["-r", &args.requests.to_string()])
                .args(["--client-id", &id.to_string()])
                .args(["--warmup", &args.warmup.to_string()])
                .args(["--model-name", &args.model_name])
                .arg("-s")
                .arg("-f")
                .arg(&folder)
                .stdout(Stdio::from(out.try_clone()?))
                .stderr(Stdio::from(out));
            if let Some(image) = &args.image {
                cmd.arg("-i").arg(image);
            }
            if args.debug_mode {
                cmd.arg("-d");
            }
            let child = cmd
                .spawn()
                .with_context(|| format!("starting {}", app.display()))?;
            children.push((id, child));
        }
        let mut failed = Vec::new();
        for (id, mut child) in children {
            let status = child.wait().context("waiting for a client")?;
            if !status.success() {
                failed.push(format!("client {id}: {status}"));
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let mut records = Vec::with_capacity(n * args.requests);
        for id in 0..n {
            let csv = folder.join(format!("client_{id}.csv"));
            match read_csv(&csv) {
                Ok(r) => records.extend(r),
                Err(e) => failed.push(format!("client {id}: no log ({e})")),
            }
        }
        // Throughput over the window in which requests were actually in flight, not process
        // start-up: first send to last reply, across all clients.
        let first = records.iter().map(|r| r.client_sent).min().unwrap_or(0);
        let last = records.iter().map(|r| r.client_received).max().unwrap_or(0);
        let window = if last > first {
            (last - first) as f64 / 1e9
        } else {
            wall
        };
        let report = Report::from_records(
            &format!("{n} clients x {} requests", args.requests),
            &records,
            window,
        );
        println!("{}", report.table());
        if !failed.is_empty() {
            println!(
                " FAILED clients (see {}/client_*.out): {}",
                folder.display(),
                failed.join("; ")
            );
        }
        summary.push((n, report, failed.len()));
        if !args.save_logs && failed.is_empty() {
            let _ = std::fs::remove_dir_all(&folder);
        }
    }
    println!("\n clients  requests  errors  failed      req/s    p50[ms]    p90[ms]    p99[ms]  p99.9[ms]");
    let mut csv = String::from(
        "clients,requests,errors,failed_clients,throughput_rps,p50_ns,p90_ns,p99_ns,p999_ns\n",
    );
    for (n, r, failed) in &summary {
        let e = &r.stages[0];
        println!(
            " {:>7}  {:>8}  {:>6}  {:>6}  {:>9.1}  {:>9.3}  {:>9.3}  {:>9.3}  {:>9.3}",
            n,
            r.requests,
            r.errors,
            failed,
            r.throughput(),
            e.p50 as f64 / 1e6,
            e.p90 as f64 / 1e6,
            e.p99 as f64 / 1e6,
            e.p999 as f64 / 1e6
        );
        csv.push_str(&format!(
            "{n},{},{},{failed},{:.3},{},{},{},{}\n",
            r.requests,
            r.errors,
            r.throughput(),
            e.p50,
            e.p90,
            e.p99,
            e.p999
        ));
    }
    std::fs::create_dir_all(&args.folder)?;
    let path = args.folder.join("multi_client_summary.csv");
    std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?;
    println!(" summary: {}", path.display());
    if summary.iter().any(|(_, _, f)| *f > 0) {
        bail!("some clients failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::levels;

    #[test]
    fn range_levels_double_up_to_n() {
        assert_eq!(levels("single", 5).unwrap(), vec![5]);
        assert_eq!(levels("range", 1).unwrap(), vec![1]);
        assert_eq!(levels("range", 8).unwrap(), vec![1, 2, 4, 8]);
        assert_eq!(levels("range", 6).unwrap(), vec![1, 2, 4, 6]);
        assert!(levels("other", 2).is_err());
    }
}

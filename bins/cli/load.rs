//! multi_client's in-process mode: one process drives the load (bins/multi_client.rs parses,
//! runtime/src/load does the work), prints a stage table per level and a summary table, and
//! with -s writes load_summary.csv, requests.csv, resources.csv and run.json (docs/results.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use hacserve_runtime::client::{prepare_payloads, RequestPayload};
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::libzmq::Context;
use hacserve_runtime::load::driver::check_geometry as check_load_geometry;
use hacserve_runtime::load::output::{
    level_table, summary_table, write_requests_csv, write_summary_csv, REQUESTS_SCHEMA,
    SUMMARY_SCHEMA,
};
use hacserve_runtime::load::{
    concurrency_levels, rate_levels, sweep, Connections, Distribution, Level, LoadLink, RdmaLink,
    SweepOptions, WindowRule, ZmqLink,
};
use hacserve_runtime::protocol::{Task, Workload, HEADER_LEN, RESPONSE_BODY_LEN};
use hacserve_runtime::resources::self_process;
use hacserve_runtime::signal;
use hacserve_runtime::transport::rdma::{
    check_geometry, RdmaClientConfig, FAST_WORD_LEN, MIN_SLOT_SIZE,
};

use super::results::{run_info, Recording};

/// The in-process mode's options, as multi_client parsed them.
#[derive(Debug, Clone)]
pub struct LoadArgs {
    pub host: String,
    pub port: u16,
    pub connections: usize,
    pub application: String,
    pub task: String,
    pub save_logs: bool,
    pub folder: PathBuf,
    pub model_name: String,
    pub image: Option<PathBuf>,
    pub warmup: u64,
    pub concurrency_range: Option<String>,
    pub request_rate_range: Option<String>,
    pub request_distribution: String,
    pub measurement_interval_ms: u64,
    pub measurement_request_count: Option<u64>,
    pub stability_percentage: f64,
    pub max_trials: usize,
    pub depth: usize,
    pub threads: usize,
    pub timeout_ms: u64,
    pub poll_mode: String,
    pub payload_size: Option<usize>,
    pub server_pid: Option<u32>,
    pub pin: bool,
    pub first_core: usize,
    pub log_capacity: usize,
    pub sample_ms: u64,
}

impl LoadArgs {
    fn levels(&self) -> Result<Vec<Level>> {
        let mut levels = Vec::new();
        if let Some(r) = &self.concurrency_range {
            levels.extend(concurrency_levels(r)?);
        }
        if let Some(r) = &self.request_rate_range {
            levels.extend(rate_levels(r)?);
        }
        Ok(levels)
    }

    fn payloads(&self, workload: Workload) -> Result<Vec<RequestPayload>> {
        if self.payload_size.is_some()
            && workload
                .tasks()
                .iter()
                .any(|t| !matches!(t, Task::Echo | Task::Sink))
        {
            bail!("--payload-size applies to the echo and sink tasks only");
        }
        let image = match (&self.payload_size, &self.image) {
            (Some(_), _) => Vec::new(),
            (None, image) => {
                let path = image
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("models/grace_hopper_500x546.jpg"));
                std::fs::read(&path).with_context(|| format!("reading image {}", path.display()))?
            }
        };
        prepare_payloads(workload, &image, self.payload_size)
            .with_context(|| format!("preparing the {} payloads", workload.name()))
    }
}

/// Runs the sweep; fails when a level saw no successful request or the sweep was cut short.
pub fn run(args: &LoadArgs) -> Result<()> {
    signal::install_stop_handler();
    let app = args
        .application
        .rsplit('/')
        .next()
        .unwrap_or(&args.application);
    let workload = Workload::parse(&args.task).map_err(anyhow::Error::msg)?;
    let busy_poll = match args.poll_mode.as_str() {
        "busy" => true,
        "block" => false,
        other => bail!("--poll-mode must be busy or block, not {other:?}"),
    };
    let payloads = args.payloads(workload)?;
    check_load_geometry(args.depth, &payloads)?;
    let largest = payloads.iter().map(|p| p.bytes.len()).max().unwrap_or(0);
    // One arm per transport the load generator speaks (runtime/src/load/link/).
    match app {
        "zmq_client" => {
            // Echoes carry the payload back; FLAG_LOGITS replies are not asked for.
            let max_reply = HEADER_LEN + RESPONSE_BODY_LEN + largest + 4096;
            let ctx = Context::new().context("creating the ZeroMQ context")?;
            let links = (0..args.connections)
                .map(|_| ZmqLink::connect(&ctx, &args.host, args.port, args.depth, max_reply))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("connecting to tcp://{}:{}", args.host, args.port))?;
            let conns = Connections::new(links, args.depth, &payloads)?;
            run_over(args, workload, &payloads, conns, busy_poll, max_reply)
        }
        "rdma_client" => {
            // The fast path (small messages polled in memory) keeps a slot's last 4 bytes.
            let want = HEADER_LEN + largest + FAST_WORD_LEN;
            let slot_size = (want.div_ceil(4096) * 4096).max(MIN_SLOT_SIZE as usize) as u32;
            let depth = u32::try_from(args.depth).context("--depth")?;
            check_geometry(depth, slot_size)
                .with_context(|| format!("a request of {want} bytes needs a {slot_size}-byte slot"))?;
            let mode = if busy_poll {
                PollMode::Busy
            } else {
                PollMode::Block
            };
            let links = (0..args.connections)
                .map(|i| {
                    let cfg = RdmaClientConfig {
                        client_id: i as u32,
                        slot_size,
                        depth,
                        timeout: Duration::from_millis(args.timeout_ms.max(1)),
                        mode,
                        total_clients: args.connections as u32,
                        fast_path: true,
                    };
                    RdmaLink::connect(&args.host, args.port, cfg)
                })
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("connecting to rdma://{}:{}", args.host, args.port))?;
            let conns = Connections::new(links, args.depth, &payloads)?;
            // The client's response ring bounds what a reply may be.
            let max_reply = HEADER_LEN + RESPONSE_BODY_LEN + largest + 4096;
            run_over(args, workload, &payloads, conns, busy_poll, max_reply)
        }
        other => bail!(
            "-a {other}: the in-process load generator speaks zmq_client and rdma_client; use -m single|range for process-per-client {other} runs"
        ),
    }
}

/// The sweep over connections of one transport, its tables and its files.
fn run_over<L: LoadLink>(
    args: &LoadArgs,
    workload: Workload,
    payloads: &[RequestPayload],
    mut conns: Connections<L>,
    busy_poll: bool,
    max_reply: usize,
) -> Result<()> {
    let levels = args.levels()?;
    let distribution = Distribution::parse(&args.request_distribution)?;
    if args.max_trials == 0 {
        bail!("--max-trials must be at least 1");
    }
    let largest = payloads.iter().map(|p| p.bytes.len()).max().unwrap_or(0);
    let threads = args.threads.clamp(1, args.connections);
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let window = match args.measurement_request_count {
        Some(count) => WindowRule::Requests {
            count: count.max(1),
            // A count window that cannot fill (a server that stopped) still ends.
            limit: timeout.max(Duration::from_millis(args.measurement_interval_ms)),
        },
        None => WindowRule::Interval(Duration::from_millis(args.measurement_interval_ms.max(1))),
    };
    let opts = SweepOptions {
        levels: levels.clone(),
        distribution,
        window,
        stability_percent: args.stability_percentage,
        max_trials: args.max_trials,
        warmup: args.warmup,
        threads,
        depth: args.depth,
        timeout,
        busy_poll,
        pin: args.pin,
        first_core: args.first_core,
        max_reply,
        server_pid: args.server_pid,
        log_rows_per_thread: if args.save_logs {
            args.log_capacity / threads
        } else {
            0
        },
    };
    println!(
        "multi_client in-process -> {}://{}:{} task {} ({} B payload at most) model {}: {} connections x depth {}, {} threads, {} levels, windows {}, stability {}% over 3, at most {} trials",
        L::transport(),
        args.host,
        args.port,
        workload.name(),
        largest,
        args.model_name,
        args.connections,
        args.depth,
        threads,
        levels.len(),
        match window {
            WindowRule::Interval(d) => format!("{} ms", d.as_millis()),
            WindowRule::Requests { count, .. } => format!("{count} requests"),
        },
        args.stability_percentage,
        args.max_trials,
    );
    let folder = args.save_logs.then_some(args.folder.as_path());
    let recording = Recording::start(folder, Duration::from_millis(args.sample_ms), false)?;
    let cpu_before = self_process();
    let progress = super::progress::for_stderr();
    let result = sweep(&mut conns, &opts, progress.as_ref())?;
    let cpu_after = self_process();
    for r in &result.levels {
        println!("{}", level_table(r));
    }
    println!("{}", summary_table(&result.levels));
    let finished: u64 = result.levels.iter().map(|r| r.stats.finished()).sum();
    let cpu = cpu_after.cpu_s() - cpu_before.cpu_s();
    println!(
        " load generator: {cpu:.3} CPU-s over the whole run ({:.3} user, {:.3} system; warm-up and drains included), {} requests in the measured windows",
        cpu_after.user_s - cpu_before.user_s,
        cpu_after.system_s - cpu_before.system_s,
        finished,
    );
    let mut info = run_info("multi_client", L::transport());
    info.task = Some(workload.name().into());
    info.payload_bytes = Some(largest);
    info.model = Some(args.model_name.clone());
    info.hosts = vec![format!("{}:{}", args.host, args.port)];
    info.files = vec![
        ("load_summary.csv".into(), SUMMARY_SCHEMA),
        ("requests.csv".into(), REQUESTS_SCHEMA),
    ];
    info.extra = vec![
        ("connections".into(), args.connections.to_string()),
        ("depth".into(), args.depth.to_string()),
        ("threads".into(), threads.to_string()),
        (
            "levels".into(),
            levels
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("request_distribution".into(), distribution.name().into()),
        (
            "stability_percentage".into(),
            args.stability_percentage.to_string(),
        ),
        ("max_trials".into(), args.max_trials.to_string()),
    ];
    recording.finish(" load generator", None, folder, info)?;
    if args.save_logs {
        std::fs::create_dir_all(&args.folder)
            .with_context(|| format!("creating {}", args.folder.display()))?;
        let summary = args.folder.join("load_summary.csv");
        write_summary_csv(&summary, &result.levels)
            .with_context(|| format!("writing {}", summary.display()))?;
        let requests = args.folder.join("requests.csv");
        let values: Vec<f64> = levels.iter().map(Level::value).collect();
        write_requests_csv(&requests, &result.log, &values)
            .with_context(|| format!("writing {}", requests.display()))?;
        let not_logged: u64 = result.log.iter().map(|l| l.not_logged).sum();
        println!(
            " logs: {} and {}{}",
            summary.display(),
            requests.display(),
            if not_logged > 0 {
                format!(" ({not_logged} requests past --log-capacity not logged)")
            } else {
                String::new()
            }
        );
    }
    if result.interrupted {
        bail!("stopped before the last level");
    }
    if let Some(r) = result.levels.iter().find(|r| r.stats.ok == 0) {
        bail!("{}: no request succeeded", r.level);
    }
    Ok(())
}

//! zmq_balancer: forwards ZeroMQ requests to several zmq_server backends, least outstanding
//! requests first.

#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use hacserve::cli::results::run_info;
use hacserve_runtime::balancer::{format_counts, format_shares, Balancer, BalancerConfig};
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::libzmq::Context;
use hacserve_runtime::metrics::render_balancer;
use hacserve_runtime::protocol::DEFAULT_MAX_PAYLOAD;
use hacserve_runtime::transport::zmq::DEFAULT_REPLY_HWM;
use hacserve_runtime::{logging, signal};

hacserve::cli_args! {
    /// ZMQ Balancer: forwards TCP requests to one or more zmq_server backends.
    struct Args [metrics] {
        /// target server address(es): host or host:port, comma-separated
        #[argh(option, default = "String::from(\"7.7.7.2\")")]
        server_address: String,
        /// target server port (for addresses given without one)
        #[argh(option, default = "5555")]
        server_port: u16,
        /// ZMQ listen port (0 = any free port, printed at start)
        #[argh(option, default = "5555")]
        local_port: u16,
        /// use debug
        #[argh(switch, short = 'd')]
        debug: bool,
        /// connections to each backend
        #[argh(option, short = 'c', default = "1")]
        connections: usize,
        /// model name (informational)
        #[argh(option, default = "String::from(\"resnet50\")")]
        model_name: String,
        /// print each backend's share every this many seconds (0 = only at exit)
        #[argh(option, short = 'i', default = "20")]
        monitor_interval: u64,
        /// busy (spin), block or auto
        #[argh(option, default = "String::from(\"auto\")")]
        poll_mode: String,
        /// address to bind
        #[argh(option, default = "String::from(\"0.0.0.0\")")]
        bind_address: String,
        /// replies queued per client before further ones are dropped (a client that does not
        /// read its replies; counted per client)
        #[argh(option, default = "DEFAULT_REPLY_HWM")]
        reply_hwm: usize,
        /// largest request payload the backends accept (default 16 MiB): a client frame over
        /// four times that gets its connection dropped instead of being buffered
        #[argh(option, default = "DEFAULT_MAX_PAYLOAD")]
        max_payload: usize,
        /// deadline of each request in ms: a backend that has not answered by then gets its
        /// client a Timeout error (a late answer is dropped)
        #[argh(option, default = "10000")]
        timeout_ms: u64,
        /// requests in flight at once (sent to a backend or waiting for one); more are answered
        /// Overloaded
        #[argh(option, default = "8192")]
        max_in_flight: usize,
        /// requests in flight per backend connection (more wait in the balancer): keep it at or
        /// below the backends' --reply-hwm, or a backend may drop replies to the balancer
        #[argh(option, default = "DEFAULT_REPLY_HWM")]
        backend_window: usize,
        /// save resources.csv and run.json into the logs folder
        #[argh(switch, short = 's')]
        save_logs: bool,
        /// logs folder
        #[argh(option, short = 'f', default = "std::path::PathBuf::from(\"results\")")]
        folder: std::path::PathBuf,
    }
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    logging::init(args.debug);
    signal::install_stop_handler();
    let mode = PollMode::parse(&args.poll_mode, 1).map_err(anyhow::Error::msg)?;
    let backends: Vec<String> = args
        .server_address
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.contains(':') {
                s.to_string()
            } else {
                format!("{s}:{}", args.server_port)
            }
        })
        .collect();
    if backends.is_empty() {
        bail!("--server-address names no backend");
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let ctx = Context::new().context("creating the ZeroMQ context")?;
    let local = format!(
        "tcp://{}:{}",
        args.bind_address,
        if args.local_port == 0 {
            "*".to_string()
        } else {
            args.local_port.to_string()
        }
    );
    if args.timeout_ms == 0 {
        bail!("--timeout-ms must be at least 1");
    }
    let cfg = BalancerConfig {
        local: local.clone(),
        backends: backends.clone(),
        connections: args.connections,
        reply_hwm: args.reply_hwm,
        max_payload: args.max_payload,
        timeout: Duration::from_millis(args.timeout_ms),
        max_in_flight: args.max_in_flight,
        backend_window: args.backend_window,
    };
    let mut balancer = Balancer::new(&ctx, &cfg)
        .with_context(|| format!("binding {local} and connecting to {backends:?}"))?;
    let folder = args.save_logs.then_some(args.folder.as_path());
    let metrics = args.metrics();
    let recording = metrics.recording(folder)?;
    let live = balancer.live();
    recording.serve_metrics("zmq_balancer", &metrics, move |out| {
        render_balancer(out, &live)
    })?;
    println!(
        "zmq_balancer listening on {} | model {} | backends {} x{} connections | timeout {} ms | poll {:?}",
        balancer.endpoint(),
        args.model_name,
        backends.join(","),
        args.connections,
        args.timeout_ms,
        mode
    );
    let report = balancer
        .run(mode, Duration::from_secs(args.monitor_interval))
        .context("forwarding")?;
    let mut info = run_info("zmq_balancer", "zmq");
    info.model = Some(args.model_name.clone());
    info.hosts = std::iter::once(balancer.endpoint().to_string())
        .chain(backends.iter().cloned())
        .collect();
    let c = &report.counts;
    let finished = c.answered + c.timed_out + c.unavailable + c.overloaded;
    recording.finish("zmq_balancer", Some(finished), folder, info)?;
    println!(
        "zmq_balancer stopped: {} | {}",
        format_counts(&report.counts),
        format_shares(&report.shares)
    );
    if let Some(drops) = balancer.slow_peer_summary() {
        println!("zmq_balancer replies dropped, clients not reading: {drops}");
    }
    Ok(())
}

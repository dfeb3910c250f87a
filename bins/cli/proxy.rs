//! The proxies' main body: zmq_proxy and rdma_proxy differ in the inbound transport and in
//! the backend's geometry options; both forward everything over an RDMA pool.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use hacserve_runtime::contract::copies::payload_copies;
use hacserve_runtime::contract::{PollMode, ServerTransport, TransportError};
use hacserve_runtime::proxy::{format_shares, ForwarderReport, Placement, PoolConfig, Proxy};
use hacserve_runtime::server::ServerOptions;
use hacserve_runtime::transport::rdma::PdShare;

use super::results::run_info;
use super::{MetricsArgs, ProxyArgs};

/// The backend pool's shape: what differs between the two proxies' options.
pub struct Backend {
    pub port: u16,
    pub connections: usize,
    pub client_id_base: u32,
    pub slot_size: u32,
    pub depth: u32,
    /// Ask the backend for the memory-polled fast path.
    pub fast_path: bool,
    /// Zero-copy forwarding (rdma_proxy `--zero-copy on`): the protection domain the
    /// inbound connections share with the backend connections.
    pub pd_share: Option<Arc<PdShare>>,
}

/// How a proxy's run ended.
pub struct Stopped {
    /// `<counters> | <shares> | answered by the proxy: N`, the tail of both stop lines.
    pub shares: String,
    pub report: ForwarderReport,
    /// The receive loop's end: an error once the stop lines are printed.
    pub result: Result<(), TransportError>,
}

impl ProxyArgs {
    /// Logging, the stop handler, the poll mode and the forwarder's placement (auto counts
    /// a spinning thread per side with a forwarder thread, one inline: `Placement::plan`).
    pub fn prepare(&self) -> Result<(PollMode, Placement)> {
        super::init(self.debug);
        let _informational = (self.requests, self.task, self.save_logs, &self.folder);
        Placement::plan(&self.poll_mode, &self.forwarder).map_err(anyhow::Error::msg)
    }

    fn pool(&self, b: &Backend, mode: PollMode) -> PoolConfig {
        PoolConfig {
            host: self.server_address.clone(),
            port: b.port,
            connections: b.connections,
            client_id_base: b.client_id_base,
            slot_size: b.slot_size,
            depth: b.depth,
            timeout: Duration::from_millis(self.timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms.max(1)),
            mode,
            queue_limit: self.queue_depth,
            fast_path: b.fast_path,
            pd_share: b.pd_share.clone(),
        }
    }
}

/// Connects the backend pool, then forwards everything `transport` receives until a stop.
/// `monitor` names the role and how often the forwarder prints its shares; `backend_name`
/// is what the error says could not be reached; `banner` is printed once forwarding starts.
#[allow(clippy::too_many_arguments)] // each is one fact of the role; a struct would only rename them
pub fn forward<T: ServerTransport>(
    args: &ProxyArgs,
    metrics: &MetricsArgs,
    (mode, placement): (PollMode, Placement),
    backend: &Backend,
    max_payload: usize,
    transport: &mut T,
    monitor: (&'static str, Duration),
    backend_name: &str,
    banner: impl FnOnce(&T) -> String,
) -> Result<Stopped> {
    let opts = ServerOptions::forwarding(max_payload, mode, args.queue_depth, args.debug);
    // The backend first: without it the proxy is useless.
    let pool = args.pool(backend, mode);
    let mut proxy = Proxy::start(&opts, transport, pool, placement, monitor)
        .map_err(|e| anyhow!("connecting to the {backend_name}: {e}"))?;
    let role = monitor.0;
    let recording = metrics.recording(None)?;
    recording.serve_counters(role, metrics, proxy.shared_queue())?;
    let forwarder = match proxy.placement() {
        Placement::Thread => "forwarder on its own thread",
        Placement::Inline => "forwarder inline in the receive loop",
    };
    println!("{} | {forwarder}", banner(transport));
    let (served, report) = proxy.serve(transport, &opts);
    let c = proxy.counters();
    let finished = c.answered.load(Ordering::Relaxed) + c.rejected.load(Ordering::Relaxed);
    recording.finish(role, Some(finished), None, run_info(role, "rdma"))?;
    let forwarded: u64 = report.shares.iter().map(|s| s.forwarded).sum();
    let copies = payload_copies();
    let stopped = Stopped {
        shares: format!(
            "{} | {} | answered by the proxy: {} | payload copies: {copies} ({:.2} per forwarded request)",
            proxy.counters_summary(),
            format_shares(&report.shares),
            report.local_errors,
            copies as f64 / forwarded.max(1) as f64
        ),
        report,
        result: served.result,
    };
    Ok(stopped)
}

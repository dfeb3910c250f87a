//! Configuration shared by every server role.

use std::path::PathBuf;
use std::time::Duration;

use crate::contract::PollMode;

/// `--max-queued-mib` by default: 256 MiB of requests accepted but not yet processed. With
/// ordinary photos (ImageNet JPEGs average about 110 KB) both lanes at the default depth
/// (2 x 1024) hold about 220 MiB, so the depth binds first; large requests are bounded here
/// instead of at 2 x 1024 x `--max-payload` (32 GiB at the 16 MiB default). 445 queued
/// 1x3x224x224 tensors (588 KiB each) also fit: seconds of work for any backend.
pub const DEFAULT_MAX_QUEUED_MIB: usize = 256;

/// What the receive loop does with a request before queueing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoopPolicy {
    /// Validate the header, answer rejections, echoes and sinks at once (no queue hop, as
    /// eRPC's dispatch thread does for small requests), queue only what needs an engine.
    #[default]
    AnswerWithoutEngine,
    /// Queue every request untouched (a proxy: its backend answers everything, so the
    /// proxy stays transparent).
    ForwardAll,
}

/// Configuration shared by every server role.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub workers: usize,
    /// Largest request payload accepted (bytes).
    pub max_payload: usize,
    /// How the receive loop waits.
    pub poll_mode: PollMode,
    /// How the workers wait: Block parks them until a job is pushed.
    pub worker_poll_mode: PollMode,
    /// Capacity of each of the two queues (normal and priority).
    pub queue_depth: usize,
    /// Bytes the queued requests may hold, both lanes and every client together
    /// (`--max-queued-mib`); a request past it is answered `Overloaded` at once.
    pub max_queued_bytes: usize,
    /// Whether requests flagged priority use the priority queue.
    pub priority_clients: bool,
    /// With priority clients: workers 0..n take the priority lane first and the others the
    /// normal lane first (the GPU gives those n high-priority streams); 0 = every worker
    /// takes the priority lane first.
    pub priority_workers: usize,
    pub monitor_interval: Duration,
    /// Per-request log: Some(folder) writes `server_requests.csv` there at exit.
    pub log_folder: Option<PathBuf>,
    /// Records kept for the per-request log.
    pub log_capacity: usize,
    /// Pin the receive loop and the workers to cores.
    pub pin_threads: bool,
    pub debug: bool,
    pub policy: LoopPolicy,
    /// `--max-queue-delay-us`: how long a worker holding a request waits for more to fill
    /// its batch (engines with a batch above 1); zero = take what is ready and go.
    pub max_queue_delay: Duration,
}

impl ServerOptions {
    /// A forwarding role's options (a proxy): one worker (its forwarder), every request
    /// queued untouched, no monitor, no request log, no pinning.
    pub fn forwarding(max_payload: usize, mode: PollMode, queue_depth: usize, debug: bool) -> Self {
        ServerOptions {
            workers: 1,
            max_payload,
            poll_mode: mode,
            worker_poll_mode: mode,
            queue_depth,
            max_queued_bytes: DEFAULT_MAX_QUEUED_MIB << 20,
            priority_clients: false,
            priority_workers: 0,
            monitor_interval: Duration::ZERO,
            log_folder: None,
            log_capacity: 0,
            pin_threads: false,
            debug,
            policy: LoopPolicy::ForwardAll,
            max_queue_delay: Duration::ZERO,
        }
    }
}

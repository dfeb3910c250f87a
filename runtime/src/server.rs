//! The transport-independent half of a server: the work queue between the transport's
//! receive loop and the workers, the worker loop itself, live counters, the monitor line and
//! the per-request log. A transport supplies a [`ServerJob`] type and a [`ReplySink`].

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hacserve_ffi::signal;

use crate::clock::realtime_ns;
use crate::pipeline::{Outcome, Pipeline};
use crate::protocol::{ErrorCode, HEADER_LEN, RESPONSE_BODY_LEN};
use crate::stats::Summary;
use crate::transport::{ReplySink, ServerJob};

/// How idle threads wait for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Spin on the queue / socket: lowest latency, one core per thread.
    Busy,
    /// Sleep in poll/park: for shared machines.
    Block,
}

impl PollMode {
    /// Parses "busy", "block" or "auto"; auto spins only when every spinning thread gets a
    /// core of its own (plus one left for the rest of the machine).
    pub fn parse(s: &str, spinning_threads: usize) -> Result<PollMode, String> {
        match s {
            "busy" => Ok(PollMode::Busy),
            "block" => Ok(PollMode::Block),
            "auto" => {
                let cores = thread::available_parallelism().map_or(1, |n| n.get());
                Ok(if cores > spinning_threads {
                    PollMode::Busy
                } else {
                    PollMode::Block
                })
            }
            other => Err(format!(
                "poll mode must be busy, block or auto, not {other:?}"
            )),
        }
    }
}

/// A server's poll modes: its receive loop's and its workers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerPollMode {
    pub receive: PollMode,
    pub workers: PollMode,
}

impl ServerPollMode {
    /// Parses a server's `--poll-mode`: "busy" (every thread spins), "block" (every thread
    /// sleeps when idle), "hybrid" (the receive loop spins, the workers park until a job is
    /// queued) or "auto": busy when the receive loop and each of the `workers` get a core of
    /// their own plus one left over, hybrid when only the receive loop does, block otherwise.
    pub fn parse(s: &str, workers: usize) -> Result<ServerPollMode, String> {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        Self::parse_for(s, workers, cores)
    }

    fn parse_for(s: &str, workers: usize, cores: usize) -> Result<ServerPollMode, String> {
        let both = |m| ServerPollMode {
            receive: m,
            workers: m,
        };
        let hybrid = ServerPollMode {
            receive: PollMode::Busy,
            workers: PollMode::Block,
        };
        match s {
            "busy" => Ok(both(PollMode::Busy)),
            "block" => Ok(both(PollMode::Block)),
            "hybrid" => Ok(hybrid),
            "auto" if cores > workers + 1 => Ok(both(PollMode::Busy)),
            "auto" if cores > 1 => Ok(hybrid),
            "auto" => Ok(both(PollMode::Block)),
            other => Err(format!(
                "poll mode must be busy, block, hybrid or auto, not {other:?}"
            )),
        }
    }

    /// The name `parse` takes for this pair ("busy", "block" or "hybrid").
    pub fn name(&self) -> &'static str {
        match (self.receive, self.workers) {
            (PollMode::Busy, PollMode::Busy) => "busy",
            (PollMode::Busy, PollMode::Block) => "hybrid",
            (PollMode::Block, PollMode::Block) => "block",
            (PollMode::Block, PollMode::Busy) => "block receive loop, busy workers",
        }
    }
}

/// Configuration shared by every server role.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub workers: usize,
    /// Largest request payload accepted (bytes).
    pub max_payload: usize,
    /// How the receive loop waits.
    pub poll_mode: PollMode,
    /// How the workers wait: Block parks them until a job is pushed (see [`ServerPollMode`]).
    pub worker_poll_mode: PollMode,
    /// Capacity of each of the two queues (normal and priority).
    pub queue_depth: usize,
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
}

/// Counters shared by the transport loop, workers and the monitor (relaxed atomics only).
#[derive(Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub answered: AtomicU64,
    pub rejected: AtomicU64,
    pub overloaded: AtomicU64,
    pub transport_errors: AtomicU64,
    /// Replies dropped because their client was not reading them (its queue was full).
    pub dropped_replies: AtomicU64,
    pub in_queue: AtomicUsize,
}

/// Two bounded lock-free queues: priority first, then normal.
pub struct WorkQueue<J> {
    priority: ArrayQueue<J>,
    normal: ArrayQueue<J>,
    waiters: OnceLock<Vec<Thread>>,
    mode: PollMode,
    pub counters: Counters,
}

impl<J: ServerJob> WorkQueue<J> {
    pub fn new(depth: usize, mode: PollMode) -> Self {
        WorkQueue {
            priority: ArrayQueue::new(depth.max(1)),
            normal: ArrayQueue::new(depth.max(1)),
            waiters: OnceLock::new(),
            mode,
            counters: Counters::default(),
        }
    }

    /// Queues a job; gives it back when the queue is full so the caller can answer
    /// `Overloaded` instead of losing it.
    pub fn push(&self, job: J, priority: bool) -> Result<(), J> {
        let q = if priority {
            &self.priority
        } else {
            &self.normal
        };
        q.push(job)?;
        self.counters.in_queue.fetch_add(1, Ordering::Relaxed);
        if self.mode == PollMode::Block {
            if let Some(ws) = self.waiters.get() {
                for w in ws {
                    w.unpark();
                }
            }
        }
        Ok(())
    }

    /// The next job, priority lane first.
    pub fn pop(&self) -> Option<J> {
        self.pop_lanes(true)
    }

    /// The next job: from the priority lane first when `priority_first`, else from the
    /// normal lane first.
    pub fn pop_lanes(&self, priority_first: bool) -> Option<J> {
        let job = if priority_first {
            self.priority.pop().or_else(|| self.normal.pop())
        } else {
            self.normal.pop().or_else(|| self.priority.pop())
        }?;
        self.counters.in_queue.fetch_sub(1, Ordering::Relaxed);
        Some(job)
    }

    pub fn depth(&self) -> usize {
        self.counters.in_queue.load(Ordering::Relaxed)
    }
}

/// One line of the server's per-request log.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerRecord {
    pub worker: u32,
    pub client_id: u32,
    pub request_id: u64,
    pub task: u8,
    pub status: u32,
    pub received: u64,
    pub finished: u64,
}

/// Per-worker state the monitor reads: a lock-free ring of recent latencies.
pub struct WorkerProbe {
    latencies: ArrayQueue<u64>,
    pub dropped_samples: AtomicU64,
    /// Requests this thread finished (answered or rejected): each GPU's share, for one.
    pub handled: AtomicU64,
    /// Whether a monitor drains `latencies` (set by [`spawn_monitor`]); without one,
    /// [`account`] takes no samples and, unless it keeps a log, reads no clock.
    sampled: AtomicBool,
}

impl WorkerProbe {
    pub fn new() -> Self {
        WorkerProbe {
            latencies: ArrayQueue::new(1 << 16),
            dropped_samples: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            sampled: AtomicBool::new(false),
        }
    }
}

impl Default for WorkerProbe {
    fn default() -> Self {
        Self::new()
    }
}

/// Pins the calling thread to `core` (modulo the cores there are); logs when it cannot.
pub fn pin_current_thread(core: usize, what: &str) {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => {
            let id = ids[core % ids.len()];
            if !core_affinity::set_for_current(id) {
                log::warn!("{what}: could not pin to core {}", id.id);
            } else {
                log::debug!("{what}: pinned to core {}", id.id);
            }
        }
        _ => log::warn!("{what}: core list unavailable, not pinned"),
    }
}

/// Runs `workers.len()` worker threads over `queue`, each with its own pipeline and reply
/// sink, until a stop is requested and the queue is empty. Returns their log records.
pub fn spawn_workers<J, S>(
    opts: &ServerOptions,
    queue: Arc<WorkQueue<J>>,
    workers: Vec<(Pipeline, S)>,
    probes: Vec<Arc<WorkerProbe>>,
) -> io::Result<Vec<thread::JoinHandle<Vec<ServerRecord>>>>
where
    J: ServerJob,
    S: ReplySink<J> + Send + 'static,
{
    let mut handles = Vec::new();
    for (i, ((pipeline, sink), probe)) in workers.into_iter().zip(probes).enumerate() {
        let queue = queue.clone();
        let opts = opts.clone();
        let h = thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || worker_loop(i, &opts, &queue, pipeline, sink, &probe))?;
        handles.push(h);
    }
    let threads = handles.iter().map(|h| h.thread().clone()).collect();
    let _ = queue.waiters.set(threads);
    Ok(handles)
}

fn worker_loop<J: ServerJob, S: ReplySink<J>>(
    index: usize,
    opts: &ServerOptions,
    queue: &WorkQueue<J>,
    mut pipeline: Pipeline,
    mut sink: S,
    probe: &WorkerProbe,
) -> Vec<ServerRecord> {
    if opts.pin_threads {
        pin_current_thread(index + 1, &format!("worker {index}"));
    }
    let mut reply = Vec::with_capacity(HEADER_LEN + RESPONSE_BODY_LEN + pipeline.max_payload());
    let mut log = Vec::with_capacity(if opts.log_folder.is_some() {
        opts.log_capacity
    } else {
        0
    });
    let who = format!("worker {index}");
    let priority_first = opts.priority_workers == 0 || index < opts.priority_workers;
    // Jobs taken together, their replies and outcomes: allocated once.
    let batch_cap = pipeline.batch_capacity();
    let mut batch: Vec<J> = Vec::with_capacity(batch_cap);
    let mut batch_replies: Vec<Vec<u8>> = (0..batch_cap)
        .map(|_| Vec::with_capacity(HEADER_LEN + RESPONSE_BODY_LEN + 256))
        .collect();
    let mut batch_outcomes = vec![Outcome::Rejected(ErrorCode::Internal); batch_cap];
    let mut idle_spins = 0u32;
    loop {
        let Some(job) = queue.pop_lanes(priority_first) else {
            if signal::stop_requested() {
                break;
            }
            match opts.worker_poll_mode {
                PollMode::Busy => std::hint::spin_loop(),
                PollMode::Block => {
                    // Spin briefly before sleeping: a request right behind this one is common.
                    idle_spins += 1;
                    if idle_spins > 2000 {
                        thread::park_timeout(Duration::from_millis(50));
                        idle_spins = 0;
                    }
                }
            }
            continue;
        };
        idle_spins = 0;
        // Dynamic batching: whatever else is ready right now joins this job (no waiting, so
        // a lone request is never delayed for company).
        if batch_cap > 1 {
            while batch.len() + 1 < batch_cap {
                match queue.pop_lanes(priority_first) {
                    Some(more) => batch.push(more),
                    None => break,
                }
            }
        }
        if !batch.is_empty() {
            batch.insert(0, job);
            pipeline.handle_batch(&batch, &mut batch_replies, &mut batch_outcomes);
            for (i, job) in batch.drain(..).enumerate() {
                let received = job.received_ns();
                let sent = sink.reply(job, &batch_replies[i]);
                account(
                    &queue.counters,
                    probe,
                    &mut log,
                    index as u32,
                    &batch_replies[i],
                    received,
                    batch_outcomes[i],
                    pipeline.batch_error(i),
                    sent,
                    opts.debug,
                    &who,
                );
            }
            continue;
        }
        let received = job.received_ns();
        let outcome = pipeline.handle(job.message(), received, &mut reply);
        let sent = sink.reply(job, &reply);
        account(
            &queue.counters,
            probe,
            &mut log,
            index as u32,
            &reply,
            received,
            outcome,
            pipeline.last_error(),
            sent,
            opts.debug,
            &who,
        );
    }
    log
}

/// Counts, samples, logs and records one finished request: shared by the workers and by a
/// transport's receive loop (which answers echoes and rejections itself).
#[allow(clippy::too_many_arguments)]
pub fn account(
    counters: &Counters,
    probe: &WorkerProbe,
    log: &mut Vec<ServerRecord>,
    worker: u32,
    reply: &[u8],
    received: u64,
    outcome: Outcome,
    error_text: &str,
    sent: Result<(), crate::transport::TransportError>,
    debug: bool,
    who: &str,
) {
    let (client_id, request_id, task) = crate::transport::ids_of(reply);
    match outcome {
        Outcome::Answered { .. } => {
            counters.answered.fetch_add(1, Ordering::Relaxed);
            if debug {
                log::debug!("{who}: client {client_id} request {request_id} {outcome:?}");
            }
        }
        Outcome::Rejected(code) => {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "{who}: rejected client {client_id} request {request_id}: {code:?}: {error_text}"
            );
        }
    }
    match sent {
        Ok(()) => {}
        // Counted and logged per peer by the transport.
        Err(crate::transport::TransportError::PeerNotReading) => {
            counters.dropped_replies.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            counters.transport_errors.fetch_add(1, Ordering::Relaxed);
            log::error!("{who}: reply to client {client_id} request {request_id} failed: {e}");
        }
    }
    probe.handled.fetch_add(1, Ordering::Relaxed);
    let sampled = probe.sampled.load(Ordering::Relaxed);
    let logged = log.len() < log.capacity();
    if !sampled && !logged {
        // Nobody reads the finish time: skip the clock (a syscall where the clocksource is
        // not the TSC, e.g. ~2 us in the emulated testbed).
        return;
    }
    let finished = realtime_ns();
    if sampled
        && probe
            .latencies
            .push(finished.saturating_sub(received))
            .is_err()
    {
        probe.dropped_samples.fetch_add(1, Ordering::Relaxed);
    }
    if logged {
        log.push(ServerRecord {
            worker,
            client_id,
            request_id,
            task,
            status: match outcome {
                Outcome::Answered { .. } => 0,
                Outcome::Rejected(c) => c as u32,
            },
            received,
            finished,
        });
    }
}

/// Answers `Overloaded` for a job the queue had no room for, through the same sink type.
pub fn overloaded_reply(msg: &[u8], out: &mut Vec<u8>) {
    let (client, request) = crate::protocol::Header::salvage_ids(msg);
    crate::protocol::encode_error(
        out,
        client,
        request,
        crate::protocol::Task::Echo,
        ErrorCode::Overloaded,
        "server queue is full, retry later",
    );
}

/// Prints one monitor line per interval: req/s, queue depth, server-side p50/p99 (receive to
/// reply) over the interval. Returns when a stop is requested.
pub fn spawn_monitor<J: ServerJob>(
    interval: Duration,
    queue: Arc<WorkQueue<J>>,
    probes: Vec<Arc<WorkerProbe>>,
) -> io::Result<thread::JoinHandle<()>> {
    for p in &probes {
        p.sampled.store(true, Ordering::Relaxed);
    }
    thread::Builder::new()
        .name("monitor".into())
        .spawn(move || {
            let mut samples = Vec::with_capacity(1 << 16);
            let mut last = Instant::now();
            let mut last_answered = 0u64;
            while !signal::stop_requested() {
                thread::sleep(Duration::from_millis(50));
                if last.elapsed() < interval {
                    continue;
                }
                let secs = last.elapsed().as_secs_f64();
                last = Instant::now();
                samples.clear();
                for p in &probes {
                    while let Some(v) = p.latencies.pop() {
                        samples.push(v);
                    }
                }
                let c = &queue.counters;
                let answered =
                    c.answered.load(Ordering::Relaxed) + c.rejected.load(Ordering::Relaxed);
                let s = Summary::of(&mut samples);
                println!(
                    "[monitor] {:>9.1} req/s  queue {:>4}  p50 {:>9.1} us  p99 {:>9.1} us  total {}  errors {}  overloaded {}  dropped {}",
                    (answered - last_answered) as f64 / secs,
                    queue.depth(),
                    s.p50 as f64 / 1e3,
                    s.p99 as f64 / 1e3,
                    answered,
                    c.rejected.load(Ordering::Relaxed),
                    c.overloaded.load(Ordering::Relaxed),
                    c.dropped_replies.load(Ordering::Relaxed),
                );
                let _ = io::stdout().flush();
                last_answered = answered;
            }
        })
}

/// Writes the merged per-request log, sorted by receive time.
pub fn write_server_log(folder: &Path, mut records: Vec<ServerRecord>) -> io::Result<PathBuf> {
    std::fs::create_dir_all(folder)?;
    records.sort_by_key(|r| r.received);
    let path = folder.join("server_requests.csv");
    let mut w = io::BufWriter::new(std::fs::File::create(&path)?);
    writeln!(
        w,
        "worker,client_id,request_id,task,status,received_ns,finished_ns,server_ns"
    )?;
    for r in &records {
        writeln!(
            w,
            "{},{},{},{},{},{},{},{}",
            r.worker,
            r.client_id,
            r.request_id,
            r.task,
            r.status,
            r.received,
            r.finished,
            r.finished.saturating_sub(r.received)
        )?;
    }
    w.flush()?;
    Ok(path)
}

/// A server's threads around its transport's receive loop: the workers, the monitor, the queue
/// between them and the latency probes (probe 0 is the receive loop's, which answers echoes
/// and rejections itself). Every server role starts and stops them the same way.
pub struct ServerThreads<J> {
    pub queue: Arc<WorkQueue<J>>,
    pub probes: Vec<Arc<WorkerProbe>>,
    workers: Vec<thread::JoinHandle<Vec<ServerRecord>>>,
    monitor: Option<thread::JoinHandle<()>>,
}

impl<J: ServerJob> ServerThreads<J> {
    /// Starts one worker per (pipeline, sink), the monitor when an interval is set, and pins
    /// the calling thread (the receive loop) to core 0 when pinning is on.
    pub fn start<S>(opts: &ServerOptions, workers: Vec<(Pipeline, S)>) -> io::Result<Self>
    where
        S: ReplySink<J> + Send + 'static,
    {
        let queue = Arc::new(WorkQueue::new(opts.queue_depth, opts.worker_poll_mode));
        let probes: Vec<Arc<WorkerProbe>> = (0..=workers.len()).map(|_| Arc::default()).collect();
        let handles = spawn_workers(opts, queue.clone(), workers, probes[1..].to_vec())?;
        let monitor = if opts.monitor_interval.is_zero() {
            None
        } else {
            Some(spawn_monitor(
                opts.monitor_interval,
                queue.clone(),
                probes.clone(),
            )?)
        };
        if opts.pin_threads {
            pin_current_thread(0, "receive loop");
        }
        Ok(ServerThreads {
            queue,
            probes,
            workers: handles,
            monitor,
        })
    }

    /// The receive loop's probe.
    pub fn receive_probe(&self) -> &WorkerProbe {
        &self.probes[0]
    }

    /// After the receive loop returned: stops the workers (they finish the queue first) and
    /// the monitor; returns the workers' request records.
    pub fn join(&mut self) -> Vec<ServerRecord> {
        signal::request_stop();
        let mut records = Vec::new();
        for h in self.workers.drain(..) {
            match h.join() {
                Ok(r) => records.extend(r),
                Err(_) => log::error!("a worker thread panicked"),
            }
        }
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        records
    }

    /// The end of a server's run, the same for every role: prints `<role> stopped: <counters>`
    /// and each GPU's share of the requests, and writes the per-request log into
    /// `log_folder` when there is one (returning its path).
    pub fn report_stop(
        &self,
        role: &str,
        gpus: &[usize],
        log_folder: Option<&Path>,
        records: Vec<ServerRecord>,
    ) -> io::Result<Option<PathBuf>> {
        println!("{role} stopped: {}", self.counters_summary());
        if let Some(shares) = self.per_gpu_summary(gpus) {
            println!("{role} requests per GPU: {shares}");
        }
        let Some(folder) = log_folder else {
            return Ok(None);
        };
        let path = write_server_log(folder, records)?;
        println!("request log: {}", path.display());
        Ok(Some(path))
    }

    /// "gpu 0: n, gpu 1: m": requests each GPU's workers handled (worker i runs on GPU
    /// i % gpus); None without GPUs.
    pub fn per_gpu_summary(&self, gpus: &[usize]) -> Option<String> {
        if gpus.is_empty() {
            return None;
        }
        let mut per_gpu = vec![0u64; gpus.len()];
        for (i, p) in self.probes[1..].iter().enumerate() {
            per_gpu[i % gpus.len()] += p.handled.load(Ordering::Relaxed);
        }
        let shares: Vec<String> = gpus
            .iter()
            .zip(&per_gpu)
            .map(|(g, n)| format!("gpu {g}: {n}"))
            .collect();
        Some(shares.join(", "))
    }

    /// The counters line printed at exit.
    pub fn counters_summary(&self) -> String {
        let c = &self.queue.counters;
        format!(
            "received {} answered {} rejected {} overloaded {} undeliverable {} dropped {}",
            c.received.load(Ordering::Relaxed),
            c.answered.load(Ordering::Relaxed),
            c.rejected.load(Ordering::Relaxed),
            c.overloaded.load(Ordering::Relaxed),
            c.transport_errors.load(Ordering::Relaxed),
            c.dropped_replies.load(Ordering::Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_poll_modes() {
        let busy = ServerPollMode {
            receive: PollMode::Busy,
            workers: PollMode::Busy,
        };
        let block = ServerPollMode {
            receive: PollMode::Block,
            workers: PollMode::Block,
        };
        let hybrid = ServerPollMode {
            receive: PollMode::Busy,
            workers: PollMode::Block,
        };
        assert_eq!(ServerPollMode::parse_for("busy", 4, 1), Ok(busy));
        assert_eq!(ServerPollMode::parse_for("block", 1, 64), Ok(block));
        assert_eq!(ServerPollMode::parse_for("hybrid", 1, 64), Ok(hybrid));
        // auto: a core per spinning thread plus one left over.
        assert_eq!(ServerPollMode::parse_for("auto", 1, 3), Ok(busy));
        assert_eq!(ServerPollMode::parse_for("auto", 1, 2), Ok(hybrid));
        assert_eq!(ServerPollMode::parse_for("auto", 4, 5), Ok(hybrid));
        assert_eq!(ServerPollMode::parse_for("auto", 4, 6), Ok(busy));
        assert_eq!(ServerPollMode::parse_for("auto", 1, 1), Ok(block));
        assert!(ServerPollMode::parse_for("spin", 1, 2)
            .unwrap_err()
            .contains("hybrid"));
        for m in [busy, block, hybrid] {
            assert_eq!(ServerPollMode::parse_for(m.name(), 1, 2), Ok(m));
        }
    }

    #[test]
    fn account_samples_only_for_a_monitor_and_logs_only_with_room() {
        use crate::protocol::{Header, Task};
        let counters = Counters::default();
        let probe = WorkerProbe::new();
        let mut reply = [0u8; HEADER_LEN];
        Header::request(Task::Echo, 3, 9, 0).encode(&mut reply);
        let done = Outcome::Answered {
            task: Task::Echo,
            top1: None,
        };
        let once = |probe: &WorkerProbe, log: &mut Vec<ServerRecord>| {
            let received = realtime_ns();
            account(
                &counters,
                probe,
                log,
                0,
                &reply,
                received,
                done,
                "",
                Ok(()),
                false,
                "test",
            );
        };
        let mut no_log = Vec::new();
        once(&probe, &mut no_log);
        assert_eq!(probe.latencies.len(), 0);
        assert!(no_log.is_empty());
        probe.sampled.store(true, Ordering::Relaxed);
        once(&probe, &mut no_log);
        assert_eq!(probe.latencies.len(), 1);
        let mut log = Vec::with_capacity(1);
        once(&probe, &mut log);
        assert_eq!(probe.latencies.len(), 2);
        assert_eq!((log.len(), log[0].client_id, log[0].request_id), (1, 3, 9));
        assert!(log[0].finished >= log[0].received && log[0].received > 0);
        assert_eq!(probe.handled.load(Ordering::Relaxed), 3);
        assert_eq!(counters.answered.load(Ordering::Relaxed), 3);
    }

    struct Job;
    impl ServerJob for Job {
        fn message(&self) -> &[u8] {
            &[]
        }
        fn received_ns(&self) -> u64 {
            0
        }
    }

    #[test]
    fn push_wakes_a_parked_worker_in_block_mode() {
        let queue = Arc::new(WorkQueue::<Job>::new(4, PollMode::Block));
        let (tx, rx) = std::sync::mpsc::channel();
        let q = queue.clone();
        let worker = thread::spawn(move || {
            tx.send(()).unwrap();
            let start = Instant::now();
            loop {
                if q.pop().is_some() {
                    return start.elapsed();
                }
                // Far longer than the test waits: only an unpark ends it early.
                thread::park_timeout(Duration::from_secs(30));
            }
        });
        let _ = queue.waiters.set(vec![worker.thread().clone()]);
        rx.recv().unwrap();
        thread::sleep(Duration::from_millis(100));
        assert!(queue.push(Job, false).is_ok());
        let waited = worker.join().unwrap();
        assert!(waited < Duration::from_secs(10), "woke after {waited:?}");
    }
}

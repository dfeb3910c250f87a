//! A proxy's forwarder and the proxy's run around it. The forwarder moves the serving core's
//! queue to the backend pool and each reply back through the inbound transport's reply sink;
//! it runs on a thread of its own ([`Placement::Thread`]) or inside the receive loop
//! ([`Placement::Inline`], one polling thread for both sides of the proxy).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hacserve_ffi::signal;

use super::pool::{format_shares, ConnShare, PoolConfig, RdmaPool, Reply};
use crate::contract::copies::count_payload_copy;
use crate::contract::poll::cores;
use crate::contract::{
    Backoff, Counters, PollMode, Queued, ReplySink, ServerJob, ServerTransport, TransportError,
};
use crate::server::core::SideWork;
use crate::server::{ServeResult, ServerOptions, ServerThreads, WorkQueue};

/// Idle forwarder thread with nothing at the backend, in block mode: empty rounds before it
/// parks, and the longest park (a queued request unparks it at once; the bound is for the
/// pool's timers: reconnects, late replies).
const FORWARDER_SPINS: u32 = 64;
const FORWARDER_PARK: Duration = Duration::from_millis(1);

/// Where the forwarder runs (`--forwarder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Its own thread: two polling threads, one per side; for hosts with a core for each.
    Thread,
    /// Inside the receive loop, between its transport rounds: one polling thread, for hosts
    /// with fewer cores than spinning threads.
    Inline,
}

impl Placement {
    /// "thread", "inline" or "auto": a thread of its own when the proxy busy-polls (auto
    /// chose busy only with a core for each of its two threads), else inline.
    pub fn parse(s: &str, mode: PollMode) -> Result<Placement, String> {
        match s {
            "thread" => Ok(Placement::Thread),
            "inline" => Ok(Placement::Inline),
            "auto" if mode == PollMode::Busy => Ok(Placement::Thread),
            "auto" => Ok(Placement::Inline),
            other => Err(format!(
                "--forwarder must be thread, inline or auto, not {other:?}"
            )),
        }
    }

    /// The proxy's poll mode and placement from `--poll-mode` and `--forwarder`. An auto
    /// poll mode counts the spinning threads the placement implies (a forwarder thread is a
    /// second one) under [`PollMode::parse`]'s rule, a core each plus one left over: busy
    /// with its own thread from three cores, busy inline on two, block inline on one.
    pub fn plan(poll: &str, forwarder: &str) -> Result<(PollMode, Placement), String> {
        Self::plan_on(poll, forwarder, cores())
    }

    fn plan_on(poll: &str, forwarder: &str, cores: usize) -> Result<(PollMode, Placement), String> {
        if poll != "auto" {
            let mode = PollMode::parse(poll, 0)?;
            return Ok((mode, Placement::parse(forwarder, mode)?));
        }
        let placement = match forwarder {
            "auto" if PollMode::auto_on(2, cores) == PollMode::Busy => Placement::Thread,
            "auto" => Placement::Inline,
            f => Placement::parse(f, PollMode::Block)?,
        };
        let spinning = if placement == Placement::Thread { 2 } else { 1 };
        Ok((PollMode::auto_on(spinning, cores), placement))
    }
}

/// What the forwarder did, reported when it ends.
#[derive(Debug, Clone, Default)]
pub struct ForwarderReport {
    pub shares: Vec<ConnShare>,
    /// Requests the proxy answered itself (overload, no backend, too large, backend lost,
    /// timed out).
    pub local_errors: u64,
}

/// A running proxy: the serving core's threads with the forwarder as their one worker, or
/// with none and the forwarder in the receive loop.
pub struct Proxy<J, S> {
    threads: ServerThreads<J>,
    placed: Placed<J, S>,
}

enum Placed<J, S> {
    Thread(mpsc::Receiver<ForwarderReport>),
    Inline(Box<Forwarder<J, S>>),
}

impl<J: ServerJob, S: ReplySink<J> + Send + 'static> Proxy<J, S> {
    /// Starts the forwarder, which connects every backend connection first: fails (naming
    /// the backend) when any cannot be set up, since a proxy without its backend is useless.
    /// Every `monitor.1` (when not zero) the forwarder prints `[<monitor.0>] <shares>`.
    pub fn start<T: ServerTransport<Job = J, Sink = S>>(
        opts: &ServerOptions,
        transport: &mut T,
        pool: PoolConfig,
        placement: Placement,
        monitor: (&'static str, Duration),
    ) -> Result<Self, String> {
        let sink = transport
            .reply_sink()
            .map_err(|e| format!("creating the forwarder's reply sink: {e}"))?;
        if placement == Placement::Inline {
            let threads = ServerThreads::start_with(opts, |_| Ok(Vec::new()))
                .map_err(|e| format!("starting the proxy's threads: {e}"))?;
            let fwd = Forwarder::connect(pool, threads.queue.clone(), sink, monitor)?;
            return Ok(Proxy {
                threads,
                placed: Placed::Inline(Box::new(fwd)),
            });
        }
        let (ready_tx, ready_rx) = mpsc::channel();
        let (report_tx, report_rx) = mpsc::channel();
        let mut threads = ServerThreads::start_with(opts, move |queue| {
            let h = thread::Builder::new()
                .name("forwarder".into())
                .spawn(move || {
                    let report = match Forwarder::connect(pool, queue, sink, monitor) {
                        Ok(fwd) => {
                            let _ = ready_tx.send(Ok(()));
                            forward_on_thread(fwd)
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            ForwarderReport::default()
                        }
                    };
                    let _ = report_tx.send(report);
                    Vec::new()
                })?;
            Ok(vec![h])
        })
        .map_err(|e| format!("starting the forwarder thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Proxy {
                threads,
                placed: Placed::Thread(report_rx),
            }),
            Ok(Err(e)) => {
                threads.join();
                Err(e)
            }
            Err(_) => {
                threads.join();
                Err("the forwarder thread died while connecting".into())
            }
        }
    }

    /// Receives on `transport` until a stop, then lets the forwarder finish what it holds
    /// and the transport deliver the last replies.
    pub fn serve<T: ServerTransport<Job = J, Sink = S>>(
        &mut self,
        transport: &mut T,
        opts: &ServerOptions,
    ) -> (ServeResult, ForwarderReport) {
        match &mut self.placed {
            Placed::Thread(report) => {
                let served = self.threads.serve(transport, opts);
                (served, report.try_recv().unwrap_or_default())
            }
            Placed::Inline(fwd) => {
                let served = self.threads.serve_with(transport, opts, &mut **fwd);
                (served, fwd.report())
            }
        }
    }

    /// Where the forwarder runs.
    pub fn placement(&self) -> Placement {
        match self.placed {
            Placed::Thread(_) => Placement::Thread,
            Placed::Inline(_) => Placement::Inline,
        }
    }

    /// The serving core's counters.
    pub fn counters(&self) -> &crate::contract::Counters {
        &self.threads.queue.counters
    }

    /// The serving core's queue (and its counters), for readers on other threads.
    pub fn shared_queue(&self) -> Arc<WorkQueue<Queued<J>>> {
        self.threads.queue.clone()
    }

    /// The serving core's counters line ("received N answered N rejected N overloaded N
    /// undeliverable N dropped N"): every received request is answered (by the backend or
    /// the proxy itself) or overloaded.
    pub fn counters_summary(&self) -> String {
        self.threads.counters_summary()
    }
}

/// The forwarder's state: the backend pool (connected at start), the reply sink of the
/// inbound transport and the serving core's queue.
struct Forwarder<J, S> {
    pool: RdmaPool<Queued<J>>,
    sink: S,
    queue: Arc<WorkQueue<Queued<J>>>,
    mode: PollMode,
    timeout: Duration,
    monitor: (&'static str, Duration),
    last_report: Instant,
}

impl<J: ServerJob, S: ReplySink<J>> Forwarder<J, S> {
    /// Connects every backend connection (the error names what failed, with its causes).
    fn connect(
        cfg: PoolConfig,
        queue: Arc<WorkQueue<Queued<J>>>,
        sink: S,
        monitor: (&'static str, Duration),
    ) -> Result<Self, String> {
        let pool = RdmaPool::connect(&cfg).map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        })?;
        Ok(Forwarder {
            pool,
            sink,
            queue,
            mode: cfg.mode,
            timeout: cfg.timeout,
            monitor,
            last_report: Instant::now(),
        })
    }

    /// Moves what is queued to the backend and what the backend answered to the clients;
    /// returns the progress made (0: none). A lost backend is reconnected by the pool;
    /// meanwhile it answers Unavailable.
    fn forward_round(&mut self) -> usize {
        let (role, every) = self.monitor;
        if !every.is_zero() && self.last_report.elapsed() >= every {
            self.last_report = Instant::now();
            println!("[{role}] {}", format_shares(self.pool.shares()));
        }
        let Forwarder {
            pool, sink, queue, ..
        } = self;
        let counters = &queue.counters;
        let mut reply = |q: Queued<J>, bytes: Reply<'_>| deliver(sink, counters, q, bytes);
        let mut progress = 0;
        while let Some(job) = queue.pop() {
            progress += 1;
            pool.submit(job, &mut reply);
        }
        progress + pool.poll(&mut reply)
    }

    fn drained(&self) -> bool {
        self.queue.depth() == 0 && !self.pool.has_work()
    }

    /// After a stop: finishes the queue and what is in flight, bounded by the connection
    /// timeout.
    fn drain(&mut self) {
        let since = Instant::now();
        let mut idle = Backoff::new(self.mode, FORWARDER_SPINS, FORWARDER_PARK);
        while !self.drained() && since.elapsed() <= self.timeout {
            let progress = self.forward_round() > 0;
            idle.spin_or_yield(progress);
        }
    }

    fn report(&self) -> ForwarderReport {
        ForwarderReport {
            shares: self.pool.shares().to_vec(),
            local_errors: self.pool.local_errors,
        }
    }
}

/// Inline: the receive loop runs a forwarder round after each of its own rounds, and keeps
/// polling (never waits in the transport) while a request is at the backend.
impl<J: ServerJob, S: ReplySink<J>> SideWork for Forwarder<J, S> {
    fn round(&mut self) -> usize {
        self.forward_round()
    }
    fn outstanding(&self) -> bool {
        self.pool.has_work()
    }
    fn finish(&mut self) {
        self.drain();
    }
}

/// Every reply sent inbound, the backend's or the pool's own, answers its request (the
/// serving core counted it received); a failed delivery is counted as on a server.
fn deliver<J: ServerJob, S: ReplySink<J>>(
    sink: &mut S,
    counters: &Counters,
    q: Queued<J>,
    bytes: Reply<'_>,
) {
    counters.answered.fetch_add(1, Relaxed);
    let sent = match bytes {
        Reply::Lent(lent) => sink.reply_lent(q.job, lent),
        Reply::Backend(bytes) => {
            // The sink copies the backend's reply out of its response slot.
            count_payload_copy();
            sink.reply(q.job, bytes)
        }
        Reply::Own(bytes) => sink.reply(q.job, bytes),
    };
    match sent {
        Ok(()) => {}
        Err(TransportError::PeerNotReading) => {
            counters.dropped_replies.fetch_add(1, Relaxed);
        }
        Err(e) => {
            counters.transport_errors.fetch_add(1, Relaxed);
            log::warn!("reply could not be delivered to its client: {e}");
        }
    }
}

/// The forwarder on its own thread until a stop, then [`Forwarder::drain`]. It spins while
/// requests are at the backend; idle, it follows the poll mode (busy spins, block parks: a
/// queued request unparks it).
fn forward_on_thread<J: ServerJob, S: ReplySink<J>>(mut fwd: Forwarder<J, S>) -> ForwarderReport {
    let mut idle = Backoff::new(fwd.mode, FORWARDER_SPINS, FORWARDER_PARK);
    while !signal::stop_requested() {
        let progress = fwd.forward_round() > 0;
        if fwd.pool.has_work() {
            idle.spin_or_yield(progress);
        } else {
            idle.park(progress);
        }
    }
    fwd.drain();
    fwd.report()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_places_the_forwarder_on_a_thread_only_when_busy_polling() {
        let auto = |m| Placement::parse("auto", m);
        assert_eq!(auto(PollMode::Busy), Ok(Placement::Thread));
        assert_eq!(auto(PollMode::Block), Ok(Placement::Inline));
        assert_eq!(auto(PollMode::Event), Ok(Placement::Inline));
        for m in [PollMode::Busy, PollMode::Block, PollMode::Event] {
            assert_eq!(Placement::parse("thread", m), Ok(Placement::Thread));
            assert_eq!(Placement::parse("inline", m), Ok(Placement::Inline));
        }
        let err = Placement::parse("both", PollMode::Busy).unwrap_err();
        assert!(err.contains("thread, inline or auto"), "{err}");
    }

    #[test]
    fn auto_poll_mode_counts_the_threads_of_the_placement() {
        use Placement::{Inline, Thread};
        use PollMode::{Block, Busy, Event};
        let plan = |p, f, cores| Placement::plan_on(p, f, cores).unwrap();
        // Both auto: a thread each side from three cores, one spinning thread on two.
        assert_eq!(plan("auto", "auto", 16), (Busy, Thread));
        assert_eq!(plan("auto", "auto", 3), (Busy, Thread));
        assert_eq!(plan("auto", "auto", 2), (Busy, Inline));
        assert_eq!(plan("auto", "auto", 1), (Block, Inline));
        // A placement given: auto spins only if its threads fit.
        assert_eq!(plan("auto", "thread", 2), (Block, Thread));
        assert_eq!(plan("auto", "thread", 3), (Busy, Thread));
        assert_eq!(plan("auto", "inline", 2), (Busy, Inline));
        assert_eq!(plan("auto", "inline", 1), (Block, Inline));
        // A poll mode given: the placement follows it as before.
        assert_eq!(plan("busy", "auto", 1), (Busy, Thread));
        assert_eq!(plan("block", "auto", 16), (Block, Inline));
        assert_eq!(plan("event", "thread", 16), (Event, Thread));
        let bad = Placement::plan_on("auto", "both", 2).unwrap_err();
        assert!(bad.contains("thread, inline or auto"), "{bad}");
        let bad = Placement::plan_on("spin", "auto", 2).unwrap_err();
        assert!(bad.contains("busy, block, event or auto"), "{bad}");
    }
}

//! A proxy's forwarder thread and the proxy's run around it.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hacserve_ffi::signal;

use super::pool::{format_shares, ConnShare, PoolConfig, RdmaPool, Reply};
use crate::contract::copies::count_payload_copy;
use crate::contract::{Backoff, Queued, ReplySink, ServerJob, ServerTransport, TransportError};
use crate::server::{ServeResult, ServerOptions, ServerThreads, WorkQueue};

/// Idle forwarder in block mode: empty rounds before it sleeps, and the sleep (RDMA
/// completions must be polled, so it never blocks long).
const FORWARDER_SPINS: u32 = 64;
const FORWARDER_SLEEP: Duration = Duration::from_micros(20);

/// What the forwarder did, reported when it ends.
#[derive(Debug, Clone, Default)]
pub struct ForwarderReport {
    pub shares: Vec<ConnShare>,
    /// Requests the proxy answered itself (overload, no backend, too large, backend lost,
    /// timed out).
    pub local_errors: u64,
}

/// A running proxy: the serving core's threads with the forwarder as their one worker.
pub struct Proxy<J> {
    threads: ServerThreads<J>,
    report: mpsc::Receiver<ForwarderReport>,
}

impl<J: ServerJob> Proxy<J> {
    /// Starts the forwarder, which connects every backend connection first: fails (naming
    /// the backend) when any cannot be set up, since a proxy without its backend is useless.
    /// Every `monitor.1` (when not zero) the forwarder prints `[<monitor.0>] <shares>`.
    pub fn start<T: ServerTransport<Job = J>>(
        opts: &ServerOptions,
        transport: &mut T,
        pool: PoolConfig,
        monitor: (&'static str, Duration),
    ) -> Result<Self, String> {
        let sink = transport
            .reply_sink()
            .map_err(|e| format!("creating the forwarder's reply sink: {e}"))?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let (report_tx, report_rx) = mpsc::channel();
        let threads = ServerThreads::start_with(opts, move |queue| {
            let h = thread::Builder::new()
                .name("forwarder".into())
                .spawn(move || {
                    let report = forward(pool, &queue, sink, ready_tx, monitor);
                    let _ = report_tx.send(report);
                    Vec::new()
                })?;
            Ok(vec![h])
        })
        .map_err(|e| format!("starting the forwarder thread: {e}"))?;
        let mut proxy = Proxy {
            threads,
            report: report_rx,
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(proxy),
            Ok(Err(e)) => {
                proxy.threads.join();
                Err(e)
            }
            Err(_) => {
                proxy.threads.join();
                Err("the forwarder thread died while connecting".into())
            }
        }
    }

    /// Receives on `transport` until a stop, then lets the forwarder finish what it holds
    /// and the transport deliver the last replies.
    pub fn serve<T: ServerTransport<Job = J>>(
        &mut self,
        transport: &mut T,
        opts: &ServerOptions,
    ) -> (ServeResult, ForwarderReport) {
        let served = self.threads.serve(transport, opts);
        let report = self.report.try_recv().unwrap_or_default();
        (served, report)
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

/// The forwarder: owns the backend connections (set up here, reported through `ready`),
/// moves queued requests to the backend and each reply back through `sink`. After a stop it
/// finishes the queue and what is in flight (bounded by the connection timeout).
fn forward<J: ServerJob, S: ReplySink<J>>(
    cfg: PoolConfig,
    queue: &Arc<WorkQueue<Queued<J>>>,
    mut sink: S,
    ready: mpsc::Sender<Result<(), String>>,
    (role, monitor): (&'static str, Duration),
) -> ForwarderReport {
    let mut pool: RdmaPool<Queued<J>> = match RdmaPool::connect(&cfg) {
        Ok(p) => {
            let _ = ready.send(Ok(()));
            p
        }
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            let _ = ready.send(Err(text));
            return ForwarderReport::default();
        }
    };
    // Every reply sent inbound, the backend's or the pool's own, answers its request (the
    // serving core counted it received); a failed delivery is counted as on a server.
    let counters = &queue.counters;
    let mut reply = |q: Queued<J>, bytes: Reply<'_>| {
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
    };
    let mut idle = Backoff::new(cfg.mode, FORWARDER_SPINS, FORWARDER_SLEEP);
    let mut stopping: Option<Instant> = None;
    let mut last_report = Instant::now();
    loop {
        if !monitor.is_zero() && last_report.elapsed() >= monitor {
            last_report = Instant::now();
            println!("[{role}] {}", format_shares(pool.shares()));
        }
        if stopping.is_none() && signal::stop_requested() {
            stopping = Some(Instant::now());
        }
        if let Some(since) = stopping {
            let drained = queue.depth() == 0 && pool.busy() == 0;
            if drained || since.elapsed() > cfg.timeout {
                break;
            }
        }
        let mut progress = 0;
        while let Some(job) = queue.pop() {
            progress += 1;
            pool.submit(job, &mut reply);
        }
        // A lost backend is reconnected by the pool; meanwhile it answers Unavailable.
        progress += pool.poll(&mut reply);
        idle.pause(progress > 0);
    }
    ForwarderReport {
        shares: pool.shares().to_vec(),
        local_errors: pool.local_errors,
    }
}

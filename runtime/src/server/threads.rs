//! A server's threads around its transport's receive loop: the workers, the monitor, the
//! queue between them and the latency probes; one start and one orderly stop for every role.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;

use hacserve_ffi::signal;

use super::account::{write_server_log, ServerRecord, WorkerProbe};
use super::core::{receive_loop, NoSideWork, SideWork};
use super::monitor::spawn_monitor;
use super::options::ServerOptions;
use super::queue::WorkQueue;
use super::worker::{pin_current_thread, spawn_workers};
use crate::contract::{Queued, ServerJob, ServerTransport, TransportError};
use crate::pipeline::Pipeline;

/// The threads of a server: probe 0 is the receive loop's (it answers echoes and rejections
/// itself), probes 1.. the workers'.
pub struct ServerThreads<J> {
    pub queue: Arc<WorkQueue<Queued<J>>>,
    pub probes: Vec<Arc<WorkerProbe>>,
    workers: Vec<thread::JoinHandle<Vec<ServerRecord>>>,
    monitor: Option<thread::JoinHandle<()>>,
}

/// How a server's run ended: the per-request records of every thread, and the receive
/// loop's error if it failed (the workers were still drained and the transport shut down).
pub struct ServeResult {
    pub records: Vec<ServerRecord>,
    pub result: Result<(), TransportError>,
    /// Replies the transport delivered after the stop (finished by the workers meanwhile).
    pub delivered_after_stop: usize,
}

impl<J: ServerJob> ServerThreads<J> {
    /// Starts one worker per pipeline, each with a reply sink from `transport`, the monitor
    /// when an interval is set, and pins the calling thread (the receive loop) to core 0
    /// when pinning is on.
    pub fn start<T>(
        opts: &ServerOptions,
        transport: &mut T,
        pipelines: Vec<Pipeline>,
    ) -> io::Result<Self>
    where
        T: ServerTransport<Job = J>,
    {
        let mut workers = Vec::with_capacity(pipelines.len());
        for p in pipelines {
            let sink = transport
                .reply_sink()
                .map_err(|e| io::Error::other(format!("creating a worker reply sink: {e}")))?;
            workers.push((p, sink));
        }
        let queue = Arc::new(WorkQueue::with_budget(
            opts.queue_depth,
            opts.worker_poll_mode,
            opts.max_queued_bytes,
        ));
        let probes: Vec<Arc<WorkerProbe>> = (0..=workers.len()).map(|_| Arc::default()).collect();
        let handles = spawn_workers(opts, queue.clone(), workers, probes[1..].to_vec())?;
        Self::around(opts, queue, probes, handles)
    }

    /// Like [`Self::start`] for roles whose workers are not pipelines (a proxy's forwarder):
    /// `spawn` starts them over the queue.
    pub fn start_with(
        opts: &ServerOptions,
        spawn: impl FnOnce(
            Arc<WorkQueue<Queued<J>>>,
        ) -> io::Result<Vec<thread::JoinHandle<Vec<ServerRecord>>>>,
    ) -> io::Result<Self> {
        let queue = Arc::new(WorkQueue::with_budget(
            opts.queue_depth,
            opts.worker_poll_mode,
            opts.max_queued_bytes,
        ));
        let handles = spawn(queue.clone())?;
        queue.set_waiters(handles.iter().map(|h| h.thread().clone()).collect());
        let probes = (0..=handles.len()).map(|_| Arc::default()).collect();
        Self::around(opts, queue, probes, handles)
    }

    fn around(
        opts: &ServerOptions,
        queue: Arc<WorkQueue<Queued<J>>>,
        probes: Vec<Arc<WorkerProbe>>,
        workers: Vec<thread::JoinHandle<Vec<ServerRecord>>>,
    ) -> io::Result<Self> {
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
            workers,
            monitor,
        })
    }

    /// Runs the receive loop on this thread until a stop, then stops in order: the workers
    /// finish every queued request, the transport delivers their replies and closes its
    /// connections. Nothing accepted is dropped by the stop itself.
    pub fn serve<T: ServerTransport<Job = J>>(
        &mut self,
        transport: &mut T,
        opts: &ServerOptions,
    ) -> ServeResult {
        self.serve_with(transport, opts, &mut NoSideWork)
    }

    /// [`Self::serve`] with `side` run on the receive loop's thread between its rounds
    /// (a proxy's inline forwarder); after the stop `side` finishes before the workers are
    /// joined and the transport shuts down.
    pub fn serve_with<T: ServerTransport<Job = J>>(
        &mut self,
        transport: &mut T,
        opts: &ServerOptions,
        side: &mut impl SideWork,
    ) -> ServeResult {
        let looped = receive_loop(transport, &self.queue, opts, &self.probes[0], side);
        let (mut records, result) = match looped {
            Ok(r) => (r, Ok(())),
            Err(e) => (Vec::new(), Err(e)),
        };
        side.finish();
        records.extend(self.join());
        let delivered_after_stop = match transport.shut_down(&self.queue.counters) {
            Ok(n) => n,
            Err(e) => {
                log::error!("delivering replies after the stop: {e}");
                0
            }
        };
        if delivered_after_stop > 0 {
            log::info!("delivered {delivered_after_stop} replies finished after the stop");
        }
        ServeResult {
            records,
            result,
            delivered_after_stop,
        }
    }

    /// The receive loop's probe.
    pub fn receive_probe(&self) -> &WorkerProbe {
        &self.probes[0]
    }

    /// Stops the workers (they finish the queue first) and the monitor; returns the
    /// workers' request records.
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
            "received {} answered {} rejected {} overloaded {} undeliverable {} dropped {} over-budget {}",
            c.received.load(Ordering::Relaxed),
            c.answered.load(Ordering::Relaxed),
            c.rejected.load(Ordering::Relaxed),
            c.overloaded.load(Ordering::Relaxed),
            c.transport_errors.load(Ordering::Relaxed),
            c.dropped_replies.load(Ordering::Relaxed),
            c.over_budget.load(Ordering::Relaxed)
        )
    }
}

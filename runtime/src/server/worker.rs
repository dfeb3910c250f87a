//! The worker threads: each owns one pipeline (its own engine context) and one reply sink,
//! pops validated jobs, takes whatever else is ready as one batch, answers and accounts.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use hacserve_ffi::signal;

use super::account::{Ledger, ServerRecord, WorkerProbe};
use super::options::ServerOptions;
use super::queue::WorkQueue;
use crate::contract::{Backoff, Queued, ReplySink, ServerJob};
use crate::pipeline::{Outcome, Pipeline};
use crate::protocol::{ErrorCode, HEADER_LEN, RESPONSE_BODY_LEN};

/// Empty polls a worker spins through before it parks (block mode), and the longest park:
/// a push unparks it at once, the timeout only bounds how late it sees a stop.
const WORKER_SPINS: u32 = 2000;
const WORKER_PARK: Duration = Duration::from_millis(50);

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

/// Runs one worker thread per (pipeline, sink) over `queue` until a stop is requested and
/// the queue is empty. Returns their log records.
pub fn spawn_workers<J, S>(
    opts: &ServerOptions,
    queue: Arc<WorkQueue<Queued<J>>>,
    workers: Vec<(Pipeline, S)>,
    probes: Vec<Arc<WorkerProbe>>,
) -> std::io::Result<Vec<thread::JoinHandle<Vec<ServerRecord>>>>
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
    queue.set_waiters(handles.iter().map(|h| h.thread().clone()).collect());
    Ok(handles)
}

fn worker_loop<J: ServerJob, S: ReplySink<J>>(
    index: usize,
    opts: &ServerOptions,
    queue: &WorkQueue<Queued<J>>,
    mut pipeline: Pipeline,
    mut sink: S,
    probe: &WorkerProbe,
) -> Vec<ServerRecord> {
    if opts.pin_threads {
        pin_current_thread(index + 1, &format!("worker {index}"));
    }
    let mut reply = Vec::with_capacity(HEADER_LEN + RESPONSE_BODY_LEN + pipeline.max_payload());
    let mut ledger = Ledger::new(
        &queue.counters,
        probe,
        index as u32,
        format!("worker {index}"),
        opts.log_folder.is_some().then_some(opts.log_capacity),
        opts.debug,
    );
    let priority_first = opts.priority_workers == 0 || index < opts.priority_workers;
    // Jobs taken together, their replies and outcomes: allocated once.
    let batch_cap = pipeline.batch_capacity();
    let mut batch: Vec<Queued<J>> = Vec::with_capacity(batch_cap);
    let mut batch_replies: Vec<Vec<u8>> = (0..batch_cap)
        .map(|_| Vec::with_capacity(HEADER_LEN + RESPONSE_BODY_LEN + 256))
        .collect();
    let mut batch_outcomes = vec![Outcome::Rejected(ErrorCode::Internal); batch_cap];
    let mut idle = Backoff::new(opts.worker_poll_mode, WORKER_SPINS, WORKER_PARK);
    loop {
        let Some(job) = queue.pop_lanes(priority_first) else {
            if signal::stop_requested() {
                break;
            }
            idle.park(false);
            continue;
        };
        idle.round(true);
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
            for (i, queued) in batch.drain(..).enumerate() {
                let received = queued.received_ns();
                let sent = sink.reply(queued.job, &batch_replies[i]);
                ledger.record(
                    &batch_replies[i],
                    received,
                    batch_outcomes[i],
                    pipeline.batch_error(i),
                    sent,
                );
            }
            continue;
        }
        let received = job.received_ns();
        let outcome = pipeline.handle(&job, &mut reply);
        let sent = sink.reply(job.job, &reply);
        ledger.record(&reply, received, outcome, pipeline.last_error(), sent);
    }
    ledger.log
}

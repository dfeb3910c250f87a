//! The worker threads: each owns one pipeline (its own engine context) and one reply sink,
//! pops validated jobs, takes whatever else is ready as one batch, answers and accounts.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use hacserve_ffi::signal;

use super::account::{Ledger, ServerRecord, WorkerProbe};
use super::options::ServerOptions;
use super::queue::WorkQueue;
use crate::contract::{Backoff, Queued, ReplySink, ServerJob};
use crate::pipeline::{Outcome, Pipeline};
use crate::protocol::{encode_error, ErrorCode, Header, Task, HEADER_LEN, RESPONSE_BODY_LEN};

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
        // Dynamic batching: whatever else is ready right now joins this job; with
        // --max-queue-delay-us the worker spins up to that long for more (Triton's dynamic
        // batcher), else a lone request is never delayed for company.
        if batch_cap > 1 {
            let deadline = (!opts.max_queue_delay.is_zero())
                .then(|| std::time::Instant::now() + opts.max_queue_delay);
            while batch.len() + 1 < batch_cap {
                match queue.pop_lanes(priority_first) {
                    Some(more) => batch.push(more),
                    None => match deadline {
                        Some(d) if std::time::Instant::now() < d => std::hint::spin_loop(),
                        _ => break,
                    },
                }
            }
        }
        if !batch.is_empty() {
            batch.insert(0, job);
            let ran = catch_unwind(AssertUnwindSafe(|| {
                pipeline.handle_batch(&batch, &mut batch_replies, &mut batch_outcomes)
            }));
            let panicked = ran.err().map(|p| panic_text(&*p));
            for (i, queued) in batch.drain(..).enumerate() {
                let received = queued.received_ns();
                let why = match &panicked {
                    Some(text) => {
                        batch_outcomes[i] = internal_error(&queued, text, &mut batch_replies[i]);
                        text.as_str()
                    }
                    None => pipeline.batch_error(i),
                };
                let sent = sink.reply(queued.job, &batch_replies[i]);
                ledger.record(&batch_replies[i], received, batch_outcomes[i], why, sent);
            }
            pipeline.release_growth();
            continue;
        }
        let received = job.received_ns();
        // A panic inside the pipeline (an engine or decoder bug) must not lose the request or,
        // on RDMA, keep its slot: the client gets `Internal` and the worker goes on.
        let ran = catch_unwind(AssertUnwindSafe(|| pipeline.handle(&job, &mut reply)));
        let (outcome, panicked) = match ran {
            Ok(outcome) => (outcome, None),
            Err(p) => {
                let text = panic_text(&*p);
                (internal_error(&job, &text, &mut reply), Some(text))
            }
        };
        let sent = sink.reply(job.job, &reply);
        let why = panicked.as_deref().unwrap_or(pipeline.last_error());
        ledger.record(&reply, received, outcome, why, sent);
        // Off the reply's critical path: an outsized image's buffers go back now.
        pipeline.release_growth();
    }
    ledger.log
}

/// The log and reply text for a caught panic.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error: the worker failed on this request ({what})")
}

/// Writes an `Internal` error reply for `job` into `out`.
fn internal_error<J: ServerJob>(job: &Queued<J>, text: &str, out: &mut Vec<u8>) -> Outcome {
    let (client, request, task) = match &job.header {
        Some(h) => (h.client_id, h.request_id, h.task),
        None => {
            let (c, r) = Header::salvage_ids(job.message());
            (c, r, Task::Echo)
        }
    };
    encode_error(out, client, request, task, ErrorCode::Internal, text);
    Outcome::Rejected(ErrorCode::Internal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{PollMode, TransportError};
    use crate::engine::{EngineError, InferenceEngine};
    use crate::preprocess::TENSOR_LEN;
    use crate::protocol::{decode_error, MessageKind};
    use crate::server::LoopPolicy;
    use std::sync::mpsc;

    /// An engine whose run panics: what an engine bug looks like to the worker.
    struct PanickingEngine(Vec<f32>);

    impl InferenceEngine for PanickingEngine {
        fn name(&self) -> &str {
            "panics"
        }
        fn input_shape(&self) -> [usize; 4] {
            [1, 3, 224, 224]
        }
        fn num_classes(&self) -> usize {
            10
        }
        fn input_mut(&mut self) -> Result<&mut [f32], EngineError> {
            Ok(&mut self.0)
        }
        fn run(&mut self, _: &mut [f32]) -> Result<(), EngineError> {
            panic!("engine bug");
        }
    }

    struct Job(Vec<u8>);
    impl ServerJob for Job {
        fn message(&self) -> &[u8] {
            &self.0
        }
        fn received_ns(&self) -> u64 {
            1
        }
    }

    /// Hands every reply to the test.
    struct ChannelSink(mpsc::Sender<Vec<u8>>);
    impl ReplySink<Job> for ChannelSink {
        fn reply(&mut self, _: Job, reply: &[u8]) -> Result<(), TransportError> {
            let _ = self.0.send(reply.to_vec());
            Ok(())
        }
    }

    #[test]
    fn a_panicking_engine_gets_internal_replies_and_the_worker_goes_on() {
        let opts = ServerOptions {
            policy: LoopPolicy::AnswerWithoutEngine,
            ..ServerOptions::forwarding(1 << 24, PollMode::Block, 8, false)
        };
        let queue = Arc::new(WorkQueue::new(8, PollMode::Block));
        let (tx, rx) = mpsc::channel();
        let pipeline = Pipeline::new(
            Box::new(PanickingEngine(vec![0.0; TENSOR_LEN])),
            1 << 24,
            crate::preprocess::DEFAULT_MAX_IMAGE_PIXELS,
        );
        let probes = vec![Arc::new(WorkerProbe::new())];
        let handles = spawn_workers(
            &opts,
            queue.clone(),
            vec![(pipeline, ChannelSink(tx))],
            probes,
        )
        .unwrap();
        let payload = vec![0u8; TENSOR_LEN * 4];
        for id in 0..2u64 {
            let mut head = [0u8; HEADER_LEN];
            let header = Header::request(Task::Processed, 5, id, payload.len());
            header.encode(&mut head);
            let mut msg = head.to_vec();
            msg.extend_from_slice(&payload);
            let queued = Queued {
                job: Job(msg),
                header: Some(header),
            };
            assert!(queue.push(queued, false).is_ok());
            let reply = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("a request whose engine panicked must still be answered");
            let (h, body) = Header::decode(&reply, usize::MAX).unwrap();
            assert_eq!(
                (h.kind, h.client_id, h.request_id),
                (MessageKind::Error, 5, id)
            );
            let (code, text) = decode_error(body).unwrap();
            assert_eq!(ErrorCode::from_u32(code), Some(ErrorCode::Internal));
            assert!(text.contains("engine bug"), "{text}");
        }
        // The reply is sent before it is accounted: wait for the count.
        let rejected = || {
            queue
                .counters
                .rejected
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let start = std::time::Instant::now();
        while rejected() < 2 && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(rejected(), 2);
        // The worker is still alive; it is left parked (a stop is process-wide and would
        // reach the other tests of this binary).
        assert!(handles.iter().all(|h| !h.is_finished()));
    }
}

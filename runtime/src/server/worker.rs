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
    // Jobs taken together, their replies and outcomes: allocated once, one set per batch
    // that can be in flight (two with --overlap-batches on: the pipeline's batch sets).
    let batch_cap = pipeline.batch_capacity();
    let sets = if batch_cap > 1 {
        pipeline.batch_sets()
    } else {
        1
    };
    let mut slots: Vec<BatchSlot<J>> = (0..sets).map(|_| BatchSlot::new(batch_cap)).collect();
    // Overlap: the set whose batch run is on the device, not yet answered, and the set the
    // next batch goes into.
    let mut in_flight: Option<usize> = None;
    let mut next = 0usize;
    let mut idle = Backoff::new(opts.worker_poll_mode, WORKER_SPINS, WORKER_PARK);
    loop {
        let Some(job) = queue.pop_lanes(priority_first) else {
            // Nothing new: the batch in flight is answered now rather than after the next.
            if let Some(set) = in_flight.take() {
                let ran = catch_unwind(AssertUnwindSafe(|| {
                    let slot = &mut slots[set];
                    pipeline.finish_batch(set, &mut slot.replies, &mut slot.outcomes)
                }));
                let panicked = ran.err().map(|p| panic_text(&*p));
                answer_batch(
                    &mut slots[set],
                    panicked,
                    &mut pipeline,
                    &mut sink,
                    &mut ledger,
                );
                continue;
            }
            if signal::stop_requested() {
                break;
            }
            idle.park(false);
            continue;
        };
        idle.round(true);
        let batch = &mut slots[next].jobs;
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
        if sets > 1 && (!batch.is_empty() || in_flight.is_some()) {
            // Overlap: this batch is decoded, preprocessed and launched into set `next` while
            // the one in flight (the other set) still runs; that one is answered after.
            batch.insert(0, job);
            let set = next;
            let began = catch_unwind(AssertUnwindSafe(|| {
                let slot = &mut slots[set];
                pipeline.begin_batch(set, &slot.jobs, &mut slot.replies, &mut slot.outcomes)
            }));
            let failed = match began {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("internal error: {e}")),
                Err(p) => Some(panic_text(&*p)),
            };
            if let Some(prev) = in_flight.take() {
                let ran = catch_unwind(AssertUnwindSafe(|| {
                    let slot = &mut slots[prev];
                    pipeline.finish_batch(prev, &mut slot.replies, &mut slot.outcomes)
                }));
                let panicked = ran.err().map(|p| panic_text(&*p));
                answer_batch(
                    &mut slots[prev],
                    panicked,
                    &mut pipeline,
                    &mut sink,
                    &mut ledger,
                );
            }
            match failed {
                // Its requests get `Internal` now; the set's engine state is settled when
                // it is next begun.
                Some(text) => answer_batch(
                    &mut slots[set],
                    Some(text),
                    &mut pipeline,
                    &mut sink,
                    &mut ledger,
                ),
                None => {
                    in_flight = Some(set);
                    next = (set + 1) % sets;
                }
            }
            continue;
        }
        if !batch.is_empty() {
            batch.insert(0, job);
            let ran = catch_unwind(AssertUnwindSafe(|| {
                let slot = &mut slots[next];
                pipeline.handle_batch(&slot.jobs, &mut slot.replies, &mut slot.outcomes)
            }));
            let panicked = ran.err().map(|p| panic_text(&*p));
            answer_batch(
                &mut slots[next],
                panicked,
                &mut pipeline,
                &mut sink,
                &mut ledger,
            );
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

/// One batch's jobs, their replies and outcomes (allocated once per worker and set).
struct BatchSlot<J> {
    jobs: Vec<Queued<J>>,
    replies: Vec<Vec<u8>>,
    outcomes: Vec<Outcome>,
}

impl<J> BatchSlot<J> {
    fn new(cap: usize) -> Self {
        BatchSlot {
            jobs: Vec::with_capacity(cap),
            replies: (0..cap)
                .map(|_| Vec::with_capacity(HEADER_LEN + RESPONSE_BODY_LEN + 256))
                .collect(),
            outcomes: vec![Outcome::Rejected(ErrorCode::Internal); cap],
        }
    }
}

/// Sends and accounts each reply of a handled (or finished) batch, in order; `panicked`
/// (the pipeline failed on the batch) turns every reply into `Internal` with that text.
fn answer_batch<J: ServerJob, S: ReplySink<J>>(
    slot: &mut BatchSlot<J>,
    panicked: Option<String>,
    pipeline: &mut Pipeline,
    sink: &mut S,
    ledger: &mut Ledger,
) {
    for (i, queued) in slot.jobs.drain(..).enumerate() {
        let received = queued.received_ns();
        let why = match &panicked {
            Some(text) => {
                slot.outcomes[i] = internal_error(&queued, text, &mut slot.replies[i]);
                text.as_str()
            }
            None => pipeline.batch_error(i),
        };
        let sent = sink.reply(queued.job, &slot.replies[i]);
        ledger.record(&slot.replies[i], received, slot.outcomes[i], why, sent);
    }
    pipeline.release_growth();
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

    const SET_CLASSES: usize = 16;

    /// What each launch and finish of the test engine saw: (set, n, launch or finish).
    type RunLog = Arc<std::sync::Mutex<Vec<(usize, usize, bool)>>>;

    /// Two batch sets of 4 host slots each, whose launch computes the logits (so the finish
    /// hands out what that set's slots held when it was launched). Logit k of an image is 1
    /// where k is the class its pixels hash to, else 0: different images get different top-1s.
    struct TwoSets {
        slots: [Vec<Vec<f32>>; 2],
        launched: [Option<(usize, Vec<f32>)>; 2],
        set: usize,
        sets: usize,
        log: RunLog,
    }

    impl TwoSets {
        fn new(sets: usize, log: RunLog) -> Self {
            let slots = || (0..4).map(|_| vec![0.0; TENSOR_LEN]).collect();
            TwoSets {
                slots: [slots(), slots()],
                launched: [None, None],
                set: 0,
                sets,
                log,
            }
        }
    }

    fn class_of(image: &[f32]) -> usize {
        let sum: f32 = image.iter().step_by(97).sum();
        (sum.abs() * 16.0) as usize % SET_CLASSES
    }

    impl InferenceEngine for TwoSets {
        fn name(&self) -> &str {
            "two-sets"
        }
        fn input_shape(&self) -> [usize; 4] {
            [1, 3, 224, 224]
        }
        fn num_classes(&self) -> usize {
            SET_CLASSES
        }
        fn input_mut(&mut self) -> Result<&mut [f32], EngineError> {
            self.slot_input_mut(0)
        }
        fn run(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
            self.run_slots(1, logits)
        }
        fn max_batch(&self) -> usize {
            4
        }
        fn slot_input_mut(&mut self, slot: usize) -> Result<&mut [f32], EngineError> {
            self.slots[self.set]
                .get_mut(slot)
                .map(Vec::as_mut_slice)
                .ok_or_else(|| EngineError::Run(format!("slot {slot}")))
        }
        fn batch_sets(&self) -> usize {
            self.sets
        }
        fn select_batch_set(&mut self, set: usize) -> Result<(), EngineError> {
            if set >= self.sets {
                return Err(EngineError::Run(format!("set {set}")));
            }
            self.set = set;
            Ok(())
        }
        fn launch_slots(&mut self, n: usize) -> Result<(), EngineError> {
            let mut logits = vec![0.0; n * SET_CLASSES];
            for (slot, out) in logits.chunks_mut(SET_CLASSES).enumerate() {
                out[class_of(&self.slots[self.set][slot])] = 1.0;
            }
            self.launched[self.set] = Some((n, logits));
            self.log.lock().unwrap().push((self.set, n, true));
            Ok(())
        }
        fn finish_slots(&mut self, n: usize, logits: &mut [f32]) -> Result<(), EngineError> {
            self.log.lock().unwrap().push((self.set, n, false));
            match self.launched[self.set].take() {
                Some((m, ran)) if m == n => {
                    logits.copy_from_slice(&ran);
                    Ok(())
                }
                other => Err(EngineError::Run(format!("finish {n} after {other:?}"))),
            }
        }
        fn run_slots(&mut self, n: usize, logits: &mut [f32]) -> Result<(), EngineError> {
            self.launch_slots(n)?;
            self.finish_slots(n, logits)
        }
    }

    /// With two batch sets the worker begins its next batch before it finishes the one in
    /// flight (the engine saw a launch of one set between the launch and finish of the other),
    /// every request is answered exactly once, each with the top-1 its image gets alone, and a
    /// truncated JPEG in the middle of the stream is rejected alone (BadImage).
    #[test]
    fn overlapped_batches_answer_every_request_once_as_alone() {
        let read = |p: &str| std::fs::read(format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let images = [
            read("../models/grace_hopper.jpg"),
            read("../models/grace_hopper_500x546.jpg"),
            read("tests/fixtures/decoder_422.jpg"),
            read("tests/fixtures/decoder_444.jpg"),
            read("tests/fixtures/decoder_progressive.jpg"),
            read("tests/fixtures/decoder_gray.jpg"),
        ];
        const REQUESTS: u64 = 22;
        // Request 9, in the middle of the stream: a truncated JPEG.
        let payloads: Vec<Vec<u8>> = (0..REQUESTS as usize)
            .map(|id| match id {
                9 => images[0][..images[0].len() / 2].to_vec(),
                id => images[id % images.len()].clone(),
            })
            .collect();
        let message = |id: u64| {
            let payload = &payloads[id as usize];
            let header = Header::request(Task::Jpeg, 5, id, payload.len());
            let mut head = [0u8; HEADER_LEN];
            header.encode(&mut head);
            let mut msg = head.to_vec();
            msg.extend_from_slice(payload);
            Queued {
                job: Job(msg),
                header: Some(header),
            }
        };
        // Alone, through a pipeline of one set: what each request should get.
        let log = RunLog::default();
        let mut alone = Pipeline::new(
            Box::new(TwoSets::new(1, log.clone())),
            1 << 24,
            crate::preprocess::DEFAULT_MAX_IMAGE_PIXELS,
        );
        let want: Vec<Vec<u8>> = (0..REQUESTS)
            .map(|id| {
                let mut out = Vec::new();
                alone.handle(&message(id), &mut out);
                out
            })
            .collect();
        let top1 = |reply: &[u8]| {
            let (h, body) = Header::decode(reply, usize::MAX).unwrap();
            match h.kind {
                MessageKind::Response => {
                    Ok(crate::protocol::ResponseBody::decode(body).unwrap().classes[0])
                }
                _ => Err(decode_error(body).unwrap().0),
            }
        };
        let classes: std::collections::HashSet<_> =
            want.iter().filter_map(|r| top1(r).ok()).collect();
        assert!(
            classes.len() > 1,
            "the images all hash to one class: {classes:?}"
        );
        // Overlapped: every request queued before the worker starts, so batches follow back
        // to back.
        let opts = ServerOptions {
            policy: LoopPolicy::AnswerWithoutEngine,
            ..ServerOptions::forwarding(1 << 24, PollMode::Block, 64, false)
        };
        let queue = Arc::new(WorkQueue::new(64, PollMode::Block));
        for id in 0..REQUESTS {
            assert!(queue.push(message(id), false).is_ok());
        }
        let log = RunLog::default();
        let pipeline = Pipeline::new(
            Box::new(TwoSets::new(2, log.clone())),
            1 << 24,
            crate::preprocess::DEFAULT_MAX_IMAGE_PIXELS,
        );
        assert_eq!(pipeline.batch_sets(), 2);
        let (tx, rx) = mpsc::channel();
        let _handles = spawn_workers(
            &opts,
            queue.clone(),
            vec![(pipeline, ChannelSink(tx))],
            vec![Arc::new(WorkerProbe::new())],
        )
        .unwrap();
        let mut got = std::collections::HashMap::new();
        for _ in 0..REQUESTS {
            let reply = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("every request is answered");
            let (h, _) = Header::decode(&reply, usize::MAX).unwrap();
            assert!(
                got.insert(h.request_id, reply).is_none(),
                "request {} answered twice",
                h.request_id
            );
        }
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a reply beyond one per request"
        );
        for (id, want) in want.iter().enumerate() {
            let reply = &got[&(id as u64)];
            assert_eq!(top1(reply), top1(want), "request {id}");
        }
        assert_eq!(
            top1(&got[&9]),
            Err(ErrorCode::BadImage as u32),
            "the truncated JPEG"
        );
        // The overlap itself: some set was launched while the other's run was unfinished.
        let log = log.lock().unwrap().clone();
        let mut open = [false; 2];
        let mut overlapped = 0;
        for &(set, _, launch) in &log {
            if launch && open[1 - set] {
                overlapped += 1;
            }
            open[set] = launch;
        }
        assert!(
            overlapped > 0,
            "no batch began while another was in flight: {log:?}"
        );
    }
}

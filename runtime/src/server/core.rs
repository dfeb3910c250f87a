//! The serving core: the one receive loop every server role runs over its transport. It
//! owns what happens to a request between the transport and the workers: counting it,
//! validating its header once, answering what needs no engine (errors, echo, sink) in the
//! loop, queueing the rest with the decoded header, answering `Overloaded` when the queue is
//! full, and accounting every answer it gives itself. The transport only moves bytes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use hacserve_ffi::signal;

use super::account::{overloaded_reply, Ledger, ServerRecord, WorkerProbe};
use super::options::{LoopPolicy, ServerOptions};
use super::queue::{Refusal, WorkQueue};
use crate::contract::{Backoff, InLoop, Queued, ServerJob, ServerTransport, TransportError};
use crate::pipeline::{answer_without_engine, Outcome, Triage};
use crate::protocol::{encode_error, ErrorCode, Header, Task, FLAG_PRIORITY, HEADER_LEN};

/// Work a receive loop does between its transport rounds, on its own thread: a proxy's
/// inline forwarder (one polling thread for both of the proxy's sides instead of two).
pub trait SideWork {
    /// One round of it; returns how much progress it made (0: none).
    fn round(&mut self) -> usize;
    /// Whether it has work outstanding that needs polling (a request at the backend): then
    /// the loop never waits in the transport, it spins and, after a while, yields its core.
    fn outstanding(&self) -> bool;
    /// After the stop, before the transport shuts down: finishes what it holds (bounded).
    fn finish(&mut self) {}
}

/// A receive loop with nothing beside its transport.
pub struct NoSideWork;

impl SideWork for NoSideWork {
    fn round(&mut self) -> usize {
        0
    }
    fn outstanding(&self) -> bool {
        false
    }
}

/// Empty rounds with side work outstanding before the loop yields its core each round (on a
/// host with fewer cores than spinning threads the peer it waits for may need that core).
const REPLY_DUE_SPINS: u32 = 64;

/// Receives requests over `transport` until a stop is requested (or the transport has
/// finished), handing what needs a worker to `queue` and running `side` after every
/// transport round. Returns the records of the requests it answered itself (worker id
/// `u32::MAX`). The workers and the transport's shutdown are the caller's (see
/// `ServerThreads::serve`).
pub fn receive_loop<T: ServerTransport>(
    transport: &mut T,
    queue: &WorkQueue<Queued<T::Job>>,
    opts: &ServerOptions,
    probe: &WorkerProbe,
    side: &mut impl SideWork,
) -> Result<Vec<ServerRecord>, TransportError> {
    let mut core = ServingCore::new(queue, opts, probe);
    let (spins, wait) = transport.idle_wait();
    let mut idle = Backoff::new(opts.poll_mode, spins, wait);
    // Rounds while side work is outstanding: spin, then (waiting modes) yield each round.
    let mut reply_due = Backoff::new(opts.poll_mode, REPLY_DUE_SPINS, Duration::ZERO);
    let mut progress = true;
    while !signal::stop_requested() && !transport.finished() {
        idle.set_wait(transport.idle_wait().1);
        // While side work is outstanding the loop never waits in the transport: the wait
        // would delay the backend's reply by a sleep (see `Backoff::spin_or_yield`).
        let outstanding = side.outstanding();
        let wait = match outstanding {
            true => Duration::ZERO,
            false => idle.round(progress),
        };
        let mut events = transport.poll(wait, &queue.counters)?;
        while let Some(job) = transport.next_request(&queue.counters)? {
            events += 1;
            core.on_request(transport, job);
        }
        events += side.round();
        progress = events > 0;
        if outstanding {
            reply_due.spin_or_yield(progress);
        } else if !progress && wait.is_zero() {
            std::hint::spin_loop();
        }
    }
    Ok(core.ledger.log)
}

/// The receive loop's per-request state, allocated once.
struct ServingCore<'a, J> {
    queue: &'a WorkQueue<Queued<J>>,
    opts: &'a ServerOptions,
    ledger: Ledger<'a>,
    error_text: String,
    overload: Vec<u8>,
}

impl<'a, J: ServerJob> ServingCore<'a, J> {
    fn new(
        queue: &'a WorkQueue<Queued<J>>,
        opts: &'a ServerOptions,
        probe: &'a WorkerProbe,
    ) -> Self {
        ServingCore {
            queue,
            opts,
            ledger: Ledger::new(
                &queue.counters,
                probe,
                u32::MAX,
                "receive loop".into(),
                opts.log_folder.is_some().then_some(opts.log_capacity),
                opts.debug,
            ),
            error_text: String::with_capacity(256),
            overload: Vec::with_capacity(HEADER_LEN + 256),
        }
    }

    /// One whole request: answered here, queued, or answered `Overloaded`. Never lost.
    fn on_request<T: ServerTransport<Job = J>>(&mut self, transport: &mut T, job: J) {
        self.queue.counters.received.fetch_add(1, Ordering::Relaxed);
        let received = job.received_ns();
        let error_text = &mut self.error_text;
        if let Some(why) = job.oversize() {
            // The bytes beyond the limit were never read: reject on the ids alone.
            error_text.clear();
            error_text.push_str(&why);
            let text = &*error_text;
            let answered = transport.answer(job, |msg, out| {
                let (client, request) = Header::salvage_ids(msg);
                let code = ErrorCode::PayloadTooLarge;
                encode_error(out, client, request, Task::Echo, code, text);
                Some(Outcome::Rejected(code))
            });
            self.account(answered, received);
            return;
        }
        let max_payload = job
            .payload_limit()
            .map_or(self.opts.max_payload, |l| l.min(self.opts.max_payload));
        let (job, header) = match self.opts.policy {
            LoopPolicy::ForwardAll => (job, None),
            LoopPolicy::AnswerWithoutEngine => {
                let mut header = None;
                let resident = job.resident().map_or(0, |r| r.payload.len());
                let answered = transport.answer(job, |msg, out| {
                    match answer_without_engine(
                        msg,
                        resident,
                        received,
                        max_payload,
                        out,
                        error_text,
                    ) {
                        Triage::Answered(outcome) => Some(outcome),
                        Triage::NeedsWorker(h) => {
                            header = Some(h);
                            None
                        }
                    }
                });
                match answered {
                    InLoop::Kept(job) => (job, header),
                    sent => {
                        self.account(sent, received);
                        return;
                    }
                }
            }
        };
        let flags = match &header {
            Some(h) => h.flags,
            None => Header::salvage_flags(job.message()),
        };
        let priority = self.opts.priority_clients && flags & FLAG_PRIORITY != 0;
        let held = job.held_bytes();
        if let Err((rejected, why)) = self.queue.push_held(Queued { job, header }, held, priority) {
            let counters = &self.queue.counters;
            counters.overloaded.fetch_add(1, Ordering::Relaxed);
            let text = match why {
                Refusal::Full => {
                    log::warn!("queue full: answering Overloaded");
                    "server queue is full, retry later"
                }
                Refusal::OverBudget => {
                    let n = counters.over_budget.fetch_add(1, Ordering::Relaxed) + 1;
                    // A flood meets the budget once per request: a line for the first and
                    // then every 1024th, so the log does not slow the loop that sheds it.
                    if n == 1 || n % 1024 == 0 {
                        log::warn!(
                            "queued requests hold {} of {} bytes (--max-queued-mib), no room for {held} more: answering Overloaded ({n} so far)",
                            self.queue.queued_bytes(),
                            self.queue.budget()
                        );
                    }
                    "server's queued-request memory budget is full, retry later"
                }
            };
            let overload = &mut self.overload;
            let answered = transport.answer(rejected.job, |msg, out| {
                overloaded_reply(msg, text, overload);
                let room = out.prepare(overload.len());
                let n = room.len();
                room.copy_from_slice(&overload[..n]);
                Some(())
            });
            // The writer always answers, so the job never comes back Kept.
            if let InLoop::Sent {
                head, sent: Err(e), ..
            } = answered
            {
                self.ledger.undelivered(e, "Overloaded reply", &head);
            }
        }
    }

    fn account(&mut self, answered: InLoop<Outcome, J>, received: u64) {
        if let InLoop::Sent {
            outcome,
            head,
            sent,
        } = answered
        {
            self.ledger
                .record(&head, received, outcome, &self.error_text, sent);
        }
    }
}

//! What happens to every finished request, whoever answered it (a worker or the receive
//! loop): counted, sampled for the monitor, optionally logged, and written out at exit.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_queue::ArrayQueue;

use crate::clock::realtime_ns;
use crate::contract::{Counters, TransportError};
use crate::pipeline::Outcome;
use crate::protocol::{ids_of, ErrorCode, MessageKind, HEADER_LEN};

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

/// Per-thread state the monitor reads: a lock-free ring of recent latencies.
pub struct WorkerProbe {
    pub(super) latencies: ArrayQueue<u64>,
    pub dropped_samples: AtomicU64,
    /// Requests this thread finished (answered or rejected): each GPU's share, for one.
    pub handled: AtomicU64,
    /// Whether a monitor drains `latencies` (set when one starts); without one,
    /// [`account`] takes no samples and, unless it keeps a log, reads no clock.
    pub(super) sampled: AtomicBool,
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

/// A thread's accounting: its probe, its log and its name for log lines.
pub struct Ledger<'a> {
    pub counters: &'a Counters,
    pub probe: &'a WorkerProbe,
    pub log: Vec<ServerRecord>,
    pub worker: u32,
    pub who: String,
    pub debug: bool,
}

impl<'a> Ledger<'a> {
    /// `log_capacity` records are kept when `logging`, none otherwise.
    pub fn new(
        counters: &'a Counters,
        probe: &'a WorkerProbe,
        worker: u32,
        who: String,
        logging: Option<usize>,
        debug: bool,
    ) -> Self {
        Ledger {
            counters,
            probe,
            log: Vec::with_capacity(logging.unwrap_or(0)),
            worker,
            who,
            debug,
        }
    }

    /// Counts a reply (`what`, whose header bytes are `reply`) the transport could not
    /// deliver: dropped for a client that is not reading (counted and logged per client by
    /// the transport), undeliverable otherwise (logged here).
    pub fn undelivered(&self, e: TransportError, what: &str, reply: &[u8]) {
        match e {
            TransportError::PeerNotReading => {
                self.counters
                    .dropped_replies
                    .fetch_add(1, Ordering::Relaxed);
            }
            e => {
                self.counters
                    .transport_errors
                    .fetch_add(1, Ordering::Relaxed);
                let (client_id, request_id, _) = ids_of(reply);
                log::error!(
                    "{}: {what} to client {client_id} request {request_id} failed: {e}",
                    self.who
                );
            }
        }
    }

    /// Counts, samples, logs and records one finished request whose reply (or its header)
    /// is `reply` and whose send ended in `sent`.
    pub fn record(
        &mut self,
        reply: &[u8],
        received: u64,
        outcome: Outcome,
        error_text: &str,
        sent: Result<(), TransportError>,
    ) {
        let (client_id, request_id, task) = ids_of(reply);
        let who = &self.who;
        match outcome {
            Outcome::Answered { .. } => {
                self.counters.answered.fetch_add(1, Ordering::Relaxed);
                self.counters.answered_by_task[usize::from(task) & 7]
                    .fetch_add(1, Ordering::Relaxed);
                if self.debug {
                    log::debug!("{who}: client {client_id} request {request_id} {outcome:?}");
                }
            }
            Outcome::Rejected(code) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                self.counters.rejected_by_code[(code as usize).min(31)]
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "{who}: rejected client {client_id} request {request_id}: {code:?}: {error_text}"
                );
            }
        }
        if let Err(e) = sent {
            self.undelivered(e, "reply", reply);
        }
        let probe = self.probe;
        probe.handled.fetch_add(1, Ordering::Relaxed);
        let sampled = probe.sampled.load(Ordering::Relaxed);
        let logged = self.log.len() < self.log.capacity();
        let timed = self.counters.timed.load(Ordering::Relaxed);
        if !sampled && !logged && !timed {
            // Nobody reads the finish time: skip the clock (a syscall where the clocksource
            // is not the TSC, e.g. ~2 us in the emulated testbed).
            return;
        }
        let finished = realtime_ns();
        if timed {
            self.time_stages(reply, finished.saturating_sub(received));
        }
        if sampled
            && probe
                .latencies
                .push(finished.saturating_sub(received))
                .is_err()
        {
            probe.dropped_samples.fetch_add(1, Ordering::Relaxed);
        }
        if logged {
            self.log.push(ServerRecord {
                worker: self.worker,
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
}

impl Ledger<'_> {
    /// The metrics histograms: receive to reply, and each server stage when `reply` is a
    /// whole response (a worker's; the receive loop passes header bytes only).
    fn time_stages(&self, reply: &[u8], total_ns: u64) {
        use crate::contract::counters::latency_bucket;
        let c = self.counters;
        c.latency_buckets[latency_bucket(total_ns)].fetch_add(1, Ordering::Relaxed);
        c.latency_sum_ns.fetch_add(total_ns, Ordering::Relaxed);
        let body = reply.get(HEADER_LEN..HEADER_LEN + 40);
        let (Some(body), Some(&kind)) = (body, reply.get(6)) else {
            return;
        };
        if kind != MessageKind::Response as u8 {
            return;
        }
        let at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        // received, started, decoded, preprocessed, inferred: four stages between them.
        for k in 0..4 {
            let ns = at(k + 1).saturating_sub(at(k));
            c.stage_buckets[k][latency_bucket(ns)].fetch_add(1, Ordering::Relaxed);
            c.stage_sum_ns[k].fetch_add(ns, Ordering::Relaxed);
        }
    }
}

/// The `Overloaded` reply (`why`) for a request the queue had no room for.
pub fn overloaded_reply(msg: &[u8], why: &str, out: &mut Vec<u8>) {
    let (client, request) = crate::protocol::Header::salvage_ids(msg);
    crate::protocol::encode_error(
        out,
        client,
        request,
        crate::protocol::Task::Echo,
        ErrorCode::Overloaded,
        why,
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Header, Task, HEADER_LEN};

    #[test]
    fn account_samples_only_for_a_monitor_and_logs_only_with_room() {
        let counters = Counters::default();
        let probe = WorkerProbe::new();
        let mut reply = [0u8; HEADER_LEN];
        Header::request(Task::Echo, 3, 9, 0).encode(&mut reply);
        let done = Outcome::Answered {
            task: Task::Echo,
            top1: None,
        };
        let once = |ledger: &mut Ledger| {
            let received = realtime_ns();
            ledger.record(&reply, received, done, "", Ok(()));
        };
        let mut no_log = Ledger::new(&counters, &probe, 0, "test".into(), None, false);
        once(&mut no_log);
        assert_eq!(probe.latencies.len(), 0);
        assert!(no_log.log.is_empty());
        probe.sampled.store(true, Ordering::Relaxed);
        once(&mut no_log);
        assert_eq!(probe.latencies.len(), 1);
        let mut logged = Ledger::new(&counters, &probe, 0, "test".into(), Some(1), false);
        once(&mut logged);
        assert_eq!(probe.latencies.len(), 2);
        let log = &logged.log;
        assert_eq!((log.len(), log[0].client_id, log[0].request_id), (1, 3, 9));
        assert!(log[0].finished >= log[0].received && log[0].received > 0);
        assert_eq!(probe.handled.load(Ordering::Relaxed), 3);
        assert_eq!(counters.answered.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_dropped_reply_is_counted_apart_from_an_undeliverable_one() {
        let counters = Counters::default();
        let probe = WorkerProbe::new();
        let mut reply = [0u8; HEADER_LEN];
        Header::request(Task::Echo, 1, 2, 0).encode(&mut reply);
        let done = Outcome::Answered {
            task: Task::Echo,
            top1: None,
        };
        let mut ledger = Ledger::new(&counters, &probe, 0, "test".into(), None, false);
        ledger.record(&reply, 0, done, "", Err(TransportError::PeerNotReading));
        ledger.record(&reply, 0, done, "", Err(TransportError::Stopped));
        assert_eq!(counters.dropped_replies.load(Ordering::Relaxed), 1);
        assert_eq!(counters.transport_errors.load(Ordering::Relaxed), 1);
        assert_eq!(counters.answered.load(Ordering::Relaxed), 2);
    }
}

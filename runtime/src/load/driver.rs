//! The load generator's sending threads: each owns some connections ([`LoadLink`]s of one
//! transport), keeps up to `depth` requests in flight on each, and records every reply into
//! its own window figures, which the controller collects once per window (an epoch counter,
//! one lock per window, none per request). Requests are encoded into one buffer per
//! connection and task, prepared once: a send rewrites the 32-byte header and hands the
//! bytes to the link.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::link::{LoadLink, Received};
use super::plan::{Distribution, Schedule};
use super::window::{WindowStats, ERROR_SLOTS, NO_REPLY, OTHER_ERROR};
use super::{LoadError, LATE_AFTER_NS};
use crate::client::RequestPayload;
use crate::clock::realtime_ns;
use crate::protocol::{decode_error, Header, MessageKind, ResponseBody, HEADER_LEN};
use crate::stats::RequestRecord;

/// Low bits of a request id: the slot it occupies on its connection (so depth <= 65536).
const SLOT_BITS: u32 = 16;
/// The open loop's longest sleep when its next send is due in under 1 ms (block mode).
const SHORT_SLEEP_NS: u64 = 50_000;
/// How often the threads look for requests past their timeout.
const TIMEOUT_SCAN_NS: u64 = 100_000_000;

/// One request in flight.
#[derive(Clone, Copy, Default)]
struct Slot {
    busy: bool,
    seq: u64,
    /// ns since the level's origin: when it was meant to go, and when it went.
    intended: u64,
    sent: u64,
    sent_real: u64,
}

/// One connection's request state (its link lives apart, so a thread can lend all its links
/// to one wait while the states stay its own).
pub struct ConnState {
    client_id: u32,
    /// The requests, encoded once (one per task; a mixture's in rotation order).
    messages: Vec<Vec<u8>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    seq: u64,
    /// Closed loop: requests this connection keeps outstanding.
    target: usize,
}

impl ConnState {
    fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// The connections of the whole run, made once and lent to the threads of each level.
pub struct Connections<L> {
    pub links: Vec<L>,
    pub states: Vec<ConnState>,
}

/// Checks the geometry every transport shares, before any connection is made.
pub fn check_geometry(depth: usize, payloads: &[RequestPayload]) -> Result<(), LoadError> {
    if depth == 0 || depth > 1 << SLOT_BITS {
        return Err(LoadError::Config(format!(
            "--depth must be 1..={}",
            1 << SLOT_BITS
        )));
    }
    if payloads.is_empty() {
        return Err(LoadError::Config("no request payload".into()));
    }
    Ok(())
}

impl<L: LoadLink> Connections<L> {
    /// The connections over `links` (connection i is client i), each with room for `depth`
    /// requests of `payloads` (a mixture's rotate).
    pub fn new(
        links: Vec<L>,
        depth: usize,
        payloads: &[RequestPayload],
    ) -> Result<Connections<L>, LoadError> {
        check_geometry(depth, payloads)?;
        let states = (0..links.len())
            .map(|i| {
                let messages = payloads
                    .iter()
                    .map(|p| {
                        let mut message = vec![0u8; HEADER_LEN + p.bytes.len()];
                        message[HEADER_LEN..].copy_from_slice(&p.bytes);
                        let mut h = [0u8; HEADER_LEN];
                        Header::request(p.task, i as u32, 0, p.bytes.len()).encode(&mut h);
                        message[..HEADER_LEN].copy_from_slice(&h);
                        message
                    })
                    .collect();
                ConnState {
                    client_id: i as u32,
                    messages,
                    slots: vec![Slot::default(); depth],
                    free: (0..depth as u32).rev().collect(),
                    seq: 0,
                    target: 0,
                }
            })
            .collect();
        Ok(Connections { links, states })
    }
}

/// What one thread does in a level.
#[derive(Clone, Copy)]
pub enum ThreadLoad {
    /// Keep each connection's `target` outstanding (set in its state).
    Closed,
    /// Send at `rate` req/s with this distribution; the first send at `first_ns`.
    Open {
        rate: f64,
        distribution: Distribution,
        first_ns: f64,
        seed: u64,
    },
}

/// State a level's controller and threads share.
pub struct LevelShared {
    pub origin: Instant,
    /// Bumped by the controller to ask every thread to hand over its window.
    pub epoch: AtomicU64,
    pub stop: AtomicBool,
    /// When the level stops, how long the threads wait for the replies still due (ns).
    pub drain_ns: u64,
    pub timeout_ns: u64,
    pub busy_poll: bool,
    pub max_reply: usize,
}

/// One thread's mailbox and live count.
#[derive(Default)]
pub struct ThreadPost {
    /// The window a thread handed over (the controller merges and resets it).
    pub mailbox: Mutex<WindowStats>,
    /// The epoch it answered last.
    pub flushed: AtomicU64,
    /// Requests it finished since the level started (for warm-up and count windows).
    pub finished: AtomicU64,
}

/// A thread's per-request log for `-s` (preallocated; full means no more rows, counted).
pub struct RequestLog {
    pub rows: Vec<(u32, RequestRecord, u64)>,
    pub not_logged: u64,
    pub level_index: u32,
}

impl RequestLog {
    pub fn with_capacity(n: usize) -> RequestLog {
        RequestLog {
            rows: Vec::with_capacity(n),
            not_logged: 0,
            level_index: 0,
        }
    }

    fn push(&mut self, record: RequestRecord, send_lag: u64) {
        if self.rows.len() < self.rows.capacity() {
            self.rows.push((self.level_index, record, send_lag));
        } else {
            self.not_logged += 1;
        }
    }
}

fn now_ns(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}

/// Runs one thread's share of a level until `shared.stop`, then drains.
pub fn drive<L: LoadLink>(
    links: &mut [L],
    states: &mut [ConnState],
    load: ThreadLoad,
    shared: &LevelShared,
    post: &ThreadPost,
    mut log: Option<&mut RequestLog>,
) -> Result<(), LoadError> {
    let mut local = WindowStats::new();
    let mut waiter = L::waiter(links);
    let mut schedule = match load {
        ThreadLoad::Open {
            rate,
            distribution,
            first_ns,
            seed,
        } => Some(Schedule::new(rate, distribution, first_ns, seed)),
        ThreadLoad::Closed => None,
    };
    // From 0 whatever the epoch is now: a thread that starts after the first bump still
    // answers it (the controller waits for every thread's flush).
    let mut my_epoch = 0;
    let mut finished = 0u64;
    let mut next_scan = TIMEOUT_SCAN_NS;
    let mut rr = 0usize;
    let mut drain_until: Option<u64> = None;
    loop {
        let epoch = shared.epoch.load(Ordering::Acquire);
        if epoch != my_epoch {
            // Once per window: hand the figures over, take back the emptied ones.
            if let Ok(mut m) = post.mailbox.lock() {
                std::mem::swap(&mut *m, &mut local);
            }
            post.flushed.store(epoch, Ordering::Release);
            my_epoch = epoch;
        }
        let measuring = my_epoch > 0;
        let now = now_ns(shared.origin);
        if drain_until.is_none() && shared.stop.load(Ordering::Acquire) {
            drain_until = Some(now + shared.drain_ns);
        }
        let mut work = 0usize;
        // Replies first: they free slots for the sends below.
        for (link, state) in links.iter_mut().zip(states.iter_mut()) {
            while let Some(got) = link.try_recv()? {
                work += 1;
                let got = match got {
                    Received::Message(bytes) => Ok(bytes),
                    Received::TooLarge => Err(()),
                };
                if let Some(done) = take_reply(state, got, shared, &mut local) {
                    finished += 1;
                    if measuring {
                        if let (Some(log), Some((rec, lag))) = (log.as_deref_mut(), done) {
                            log.push(rec, lag);
                        }
                    }
                }
            }
        }
        if now >= next_scan {
            next_scan = now + TIMEOUT_SCAN_NS;
            finished += expire(states, now, shared.timeout_ns, &mut local);
        }
        post.finished.store(finished, Ordering::Relaxed);
        if let Some(until) = drain_until {
            if states.iter().all(|s| s.outstanding() == 0) || now >= until {
                return Ok(());
            }
        } else {
            match schedule.as_mut() {
                None => {
                    for (link, state) in links.iter_mut().zip(states.iter_mut()) {
                        while state.outstanding() < state.target {
                            let t = now_ns(shared.origin);
                            if !send(link, state, t, t, &mut local)? {
                                break;
                            }
                            work += 1;
                        }
                    }
                }
                Some(sched) => {
                    // Every send that is due goes now, to the next connection with a free
                    // slot; with none free it waits, and its latency keeps counting from
                    // its intended time.
                    while sched.next() <= now_ns(shared.origin) {
                        let Some(i) = (0..states.len())
                            .map(|k| (rr + k) % states.len())
                            .find(|&i| !states[i].free.is_empty())
                        else {
                            break;
                        };
                        rr = i + 1;
                        let t = now_ns(shared.origin);
                        if !send(&mut links[i], &mut states[i], sched.next(), t, &mut local)? {
                            break;
                        }
                        sched.advance();
                        work += 1;
                    }
                }
            }
        }
        if work == 0 {
            if shared.busy_poll {
                std::hint::spin_loop();
                continue;
            }
            // Sleep in poll until a reply, the next due send or 1 ms (a window may end).
            // zmq_poll counts in ms: a send due sooner is waited for in short sleeps, so a
            // reply arriving meanwhile is read at most ~SHORT_SLEEP (+ timer slack) late;
            // --poll-mode busy spins instead.
            // With every slot taken only a reply can change anything: wait for one in poll
            // (an overdue send must not turn this into a spin).
            let slot_free = states.iter().any(|s| !s.free.is_empty());
            let wait_ms = match &schedule {
                Some(s) if drain_until.is_none() && slot_free => {
                    let left = s.next().saturating_sub(now_ns(shared.origin));
                    if left < 1_000_000 {
                        std::thread::sleep(std::time::Duration::from_nanos(
                            left.min(SHORT_SLEEP_NS),
                        ));
                        0
                    } else {
                        1
                    }
                }
                _ => 1,
            };
            L::wait(&mut waiter, links, wait_ms)?;
        }
    }
}

/// Sends the next request on `state`'s connection; false when its send queue is full (the
/// slot is given back).
fn send<L: LoadLink>(
    link: &mut L,
    state: &mut ConnState,
    intended: u64,
    now: u64,
    local: &mut WindowStats,
) -> Result<bool, LoadError> {
    let Some(slot) = state.free.pop() else {
        return Ok(false);
    };
    state.seq += 1;
    let id = (state.seq << SLOT_BITS) | u64::from(slot);
    let n = state.messages.len();
    let index = (state.seq as usize) % n;
    let message = &mut state.messages[index];
    message[16..24].copy_from_slice(&id.to_le_bytes());
    let sent_real = realtime_ns();
    if !link.try_send(index, message)? {
        state.seq -= 1;
        state.free.push(slot);
        return Ok(false);
    }
    state.slots[slot as usize] = Slot {
        busy: true,
        seq: state.seq,
        intended,
        sent: now,
        sent_real,
    };
    local.sent += 1;
    if now.saturating_sub(intended) > LATE_AFTER_NS {
        local.late_sends += 1;
    }
    Ok(true)
}

/// Matches one reply to its slot and records it. Returns None for a reply that matched no
/// request in flight, Some(record and send lag) for a success, Some(None) for an error.
#[allow(clippy::type_complexity)]
fn take_reply(
    state: &mut ConnState,
    got: Result<&[u8], ()>,
    shared: &LevelShared,
    local: &mut WindowStats,
) -> Option<Option<(RequestRecord, u64)>> {
    let received_real = realtime_ns();
    let received = now_ns(shared.origin);
    let Ok(msg) = got else {
        // Too large for the reply buffer: which request it was is unknown; it expires.
        local.errors[OTHER_ERROR] += 1;
        return None;
    };
    let Ok((header, body)) = Header::decode(msg, shared.max_reply) else {
        local.errors[OTHER_ERROR] += 1;
        return None;
    };
    let slot_index = (header.request_id & ((1 << SLOT_BITS) - 1)) as usize;
    let seq = header.request_id >> SLOT_BITS;
    let Some(slot) = state
        .slots
        .get_mut(slot_index)
        .filter(|s| s.busy && s.seq == seq)
    else {
        local.stale += 1;
        return None;
    };
    let slot = std::mem::take(slot);
    state.free.push(slot_index as u32);
    match header.kind {
        MessageKind::Response => {
            let Ok(r) = ResponseBody::decode(body) else {
                local.errors[OTHER_ERROR] += 1;
                return Some(None);
            };
            let t = r.timestamps;
            let send_lag = slot.sent - slot.intended;
            let stages = [
                send_lag,
                t.received.saturating_sub(slot.sent_real),
                t.started.saturating_sub(t.received),
                t.decoded.saturating_sub(t.started),
                t.preprocessed.saturating_sub(t.decoded),
                t.inferred.saturating_sub(t.preprocessed),
                received_real.saturating_sub(t.replied),
            ];
            let latency = received - slot.intended;
            local.record_ok(latency, &stages);
            let record = RequestRecord {
                client_id: state.client_id,
                request_id: header.request_id,
                task: header.task as u8,
                status: 0,
                client_sent: slot.sent_real,
                server: t,
                client_received: received_real,
                e2e_ns: latency,
                top1: if r.top_k > 0 { r.classes[0] as i64 } else { -1 },
            };
            Some(Some((record, send_lag)))
        }
        MessageKind::Error => {
            let code = decode_error(body)
                .map(|(c, _)| c as usize)
                .unwrap_or(OTHER_ERROR);
            let slot = if (1..ERROR_SLOTS - 1).contains(&code) {
                code
            } else {
                OTHER_ERROR
            };
            local.errors[slot] += 1;
            Some(None)
        }
        MessageKind::Request => {
            local.errors[OTHER_ERROR] += 1;
            Some(None)
        }
    }
}

/// Gives up on requests in flight longer than `timeout_ns` (counted as no-reply; a reply that
/// still comes is stale). Returns how many.
fn expire(states: &mut [ConnState], now: u64, timeout_ns: u64, local: &mut WindowStats) -> u64 {
    let mut n = 0;
    for state in states {
        for (i, slot) in state.slots.iter_mut().enumerate() {
            if slot.busy && now.saturating_sub(slot.sent) > timeout_ns {
                slot.busy = false;
                state.free.push(i as u32);
                local.errors[NO_REPLY] += 1;
                n += 1;
            }
        }
    }
    n
}

/// Sets each connection's closed-loop target.
pub fn set_targets(states: &mut [ConnState], targets: &[usize]) {
    for (s, &t) in states.iter_mut().zip(targets) {
        s.target = t;
    }
}

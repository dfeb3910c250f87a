//! zmq_balancer: ZeroMQ clients in, several zmq_server backends out, least-outstanding-
//! requests routing, with a deadline on every request and liveness for every backend.
//!
//! A client's request is admitted into the [`table`] (its envelope and a refcounted reference
//! to its bytes are kept there), sent to the live connection with the fewest outstanding
//! requests behind a ticket frame, and answered when the backend's reply carries the ticket
//! back. The balancer answers by itself when the backend cannot:
//! - `Timeout`: no reply within `--timeout-ms` (a late reply is dropped, counted `late`);
//! - `Unavailable`: no connection took it within its deadline, or the connection it was on
//!   was lost after it had been sent again once already (the first loss sends it to another
//!   backend: inference is a pure function, doing it twice is harmless);
//! - `Overloaded`: `--max-in-flight` requests are admitted already.
//!
//! Backends going down and coming back are seen through libzmq's socket monitor
//! ([`backend`]); libzmq reconnects with backoff. Nothing on this path sleeps: requests that
//! no connection can take wait in the table's FIFO while the loop keeps serving replies.

pub mod backend;
pub mod routing;
pub mod table;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hacserve_ffi::signal;
use hacserve_ffi::zmq::{
    Context, Message, PollSet, PollTarget, Socket, SocketType, ZmqError, DONTWAIT, SNDMORE,
};

use crate::contract::{Backoff, PollMode, TransportError};
use crate::protocol::{encode_error, header_bytes, ErrorCode, Header, Task, RESPONSE_BODY_LEN};
use crate::transport::slow_peers::SlowPeers;
use crate::transport::zmq::envelope::{Envelope, Received};
use crate::transport::zmq::{hard_message_limit, DEFAULT_REPLY_HWM};

pub use routing::pick_least_outstanding;
use table::{Place, RequestTable};

/// The longest zmq_poll while nothing is admitted (it returns on the first message).
const IDLE_POLL: Duration = Duration::from_millis(100);
/// The longest zmq_poll while requests are admitted: deadlines are due-checked this often
/// (a clock read; the table is scanned only once its earliest deadline has come).
const DEADLINE_TICK: Duration = Duration::from_millis(5);
/// After a stop: how long admitted requests may still be answered by their backends
/// (bounded by their own deadlines too); the rest get `Unavailable`.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What the balancer is told to do.
#[derive(Debug, Clone)]
pub struct BalancerConfig {
    /// Frontend endpoint to bind, "tcp://0.0.0.0:5555".
    pub local: String,
    /// Backends, "host:port" each.
    pub backends: Vec<String>,
    /// DEALER connections per backend.
    pub connections: usize,
    /// Replies queued per client before further ones are dropped (and counted).
    pub reply_hwm: usize,
    /// Largest request payload the backends accept: a frame far above it drops the
    /// connection that sent it instead of being buffered whole.
    pub max_payload: usize,
    /// Each request's deadline, from admission.
    pub timeout: Duration,
    /// Requests admitted at once (sent or waiting for a connection); more are `Overloaded`.
    pub max_in_flight: usize,
    /// Requests in flight per backend connection; more wait in the FIFO. At or below the
    /// backends' `--reply-hwm`, a backend never has to drop a reply to the balancer (which
    /// is one peer to it, carrying many clients' replies).
    pub backend_window: usize,
}

/// Per-backend counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendShare {
    pub address: String,
    /// Requests sent to it (a resent one counts again).
    pub forwarded: u64,
    /// Its replies delivered to a client.
    pub answered: u64,
    /// Requests on it that missed their deadline (answered `Timeout` by the balancer).
    pub timed_out: u64,
    /// Requests in flight on a connection of it when the connection was lost.
    pub lost: u64,
    /// Times a connection to it went down.
    pub downs: u64,
}

/// The balancer's own counts: what happened to every request it received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalancerCounts {
    pub received: u64,
    /// Answered by a backend.
    pub answered: u64,
    pub timed_out: u64,
    pub unavailable: u64,
    pub overloaded: u64,
    /// Sent to a second backend after the first was lost.
    pub resent: u64,
    /// Replies that came after their request was answered already (dropped).
    pub late: u64,
    /// Replies (of any kind) the client was not reading (dropped at its queue's bound).
    pub dropped: u64,
}

impl BalancerCounts {
    /// Requests admitted and not yet answered one way or another.
    pub fn open(&self) -> u64 {
        self.received - self.answered - self.timed_out - self.unavailable - self.overloaded
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct BalancerReport {
    pub shares: Vec<BackendShare>,
    pub counts: BalancerCounts,
}

/// The balancer's sockets, borrowed by the poll set for a whole run.
struct Links {
    frontend: Socket,
    /// One DEALER per (backend, connection), and its monitor's PAIR socket.
    dealers: Vec<Socket>,
    monitors: Vec<Socket>,
}

/// One backend connection's routing state.
struct Connection {
    /// Index into the backend list.
    backend: usize,
    up: bool,
    /// Requests sent on it and not answered yet.
    outstanding: u64,
}

/// Everything but the sockets.
struct State {
    conns: Vec<Connection>,
    shares: Vec<BackendShare>,
    counts: BalancerCounts,
    table: RequestTable,
    timeout: Duration,
    /// No entry's deadline comes before this: the table is scanned only from then on (all
    /// deadlines are admission + timeout, so new entries never come earlier than old ones).
    next_expiry: Option<Instant>,
    window: u64,
    slow_peers: SlowPeers,
    /// Round-robin start for ties.
    next: usize,
    load: Vec<u64>,
    error_reply: Vec<u8>,
    scratch: Vec<usize>,
}

pub struct Balancer {
    links: Links,
    state: State,
    endpoint: String,
    live: std::sync::Arc<LiveCounts>,
}

/// The counts as the run loop last published them (after every round that did something;
/// a few relaxed stores, no lock), for readers
/// on other threads (the metrics endpoint); the loop's own counts stay plain integers.
#[derive(Debug, Default)]
pub struct LiveCounts {
    pub received: AtomicU64,
    pub answered: AtomicU64,
    pub timed_out: AtomicU64,
    pub unavailable: AtomicU64,
    pub overloaded: AtomicU64,
    pub resent: AtomicU64,
    pub late: AtomicU64,
    /// Requests admitted and not answered yet, and of those the ones waiting for a connection.
    pub in_flight: AtomicU64,
    pub waiting: AtomicU64,
}

impl LiveCounts {
    fn publish(&self, c: &BalancerCounts, in_flight: usize, waiting: usize) {
        let r = Ordering::Relaxed;
        self.received.store(c.received, r);
        self.answered.store(c.answered, r);
        self.timed_out.store(c.timed_out, r);
        self.unavailable.store(c.unavailable, r);
        self.overloaded.store(c.overloaded, r);
        self.resent.store(c.resent, r);
        self.late.store(c.late, r);
        self.in_flight.store(in_flight as u64, r);
        self.waiting.store(waiting as u64, r);
    }
}

impl Balancer {
    /// Binds the frontend and opens every backend connection (they come up in the
    /// background; requests wait for them).
    pub fn new(ctx: &Context, cfg: &BalancerConfig) -> Result<Self, TransportError> {
        let frontend = ctx.socket(SocketType::Router)?;
        frontend.set_router_mandatory(true)?;
        let reply_hwm = cfg.reply_hwm.clamp(1, i32::MAX as usize);
        frontend.set_sndhwm(reply_hwm as i32)?;
        frontend.set_rcvhwm(DEFAULT_REPLY_HWM as i32)?;
        frontend.set_max_msg_size(hard_message_limit(cfg.max_payload))?;
        frontend.bind(&cfg.local)?;
        let endpoint = frontend.last_endpoint()?;
        // An echo's reply is the payload plus the response body.
        let reply_limit = hard_message_limit(cfg.max_payload + RESPONSE_BODY_LEN);
        let (mut dealers, mut monitors, mut conns) = (Vec::new(), Vec::new(), Vec::new());
        for (b, addr) in cfg.backends.iter().enumerate() {
            for _ in 0..cfg.connections.max(1) {
                let (dealer, monitor) = backend::open(ctx, addr, reply_limit)?;
                dealers.push(dealer);
                monitors.push(monitor);
                conns.push(Connection {
                    backend: b,
                    up: false,
                    outstanding: 0,
                });
            }
        }
        let table = RequestTable::new(cfg.max_in_flight);
        let state = State {
            load: vec![0; conns.len()],
            conns,
            shares: cfg
                .backends
                .iter()
                .map(|a| BackendShare {
                    address: a.clone(),
                    ..Default::default()
                })
                .collect(),
            counts: BalancerCounts::default(),
            scratch: Vec::with_capacity(table.capacity()),
            table,
            timeout: cfg.timeout,
            next_expiry: None,
            window: cfg.backend_window.max(1) as u64,
            slow_peers: SlowPeers::new(reply_hwm),
            next: 0,
            error_reply: Vec::with_capacity(512),
        };
        Ok(Balancer {
            links: Links {
                frontend,
                dealers,
                monitors,
            },
            state,
            endpoint,
            live: Default::default(),
        })
    }

    /// Replies dropped per client that was not reading them; None when there were none.
    pub fn slow_peer_summary(&self) -> Option<String> {
        self.state.slow_peers.summary(8)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The counts the run loop publishes for other threads.
    pub fn live(&self) -> std::sync::Arc<LiveCounts> {
        self.live.clone()
    }

    /// Forwards until a stop is requested, then answers what it holds (the backends' replies
    /// for up to [`STOP_GRACE`], `Unavailable` after). Prints the backends' shares every
    /// `monitor` (when not zero).
    pub fn run(
        &mut self,
        mode: PollMode,
        monitor: Duration,
    ) -> Result<BalancerReport, TransportError> {
        let Balancer {
            links, state, live, ..
        } = self;
        let links: &Links = links;
        let targets: Vec<PollTarget> = std::iter::once(PollTarget::Socket(&links.frontend))
            .chain(links.dealers.iter().map(PollTarget::Socket))
            .chain(links.monitors.iter().map(PollTarget::Socket))
            .collect();
        let mut poll = PollSet::new(&targets);
        let n = links.dealers.len();
        let mut envelope = Envelope::new();
        let mut body = Message::new();
        let mut last_report = Instant::now();
        let mut last_tick = Instant::now();
        let mut stopping: Option<Instant> = None;
        // zmq_poll wakes on the first message: block at once when idle, never while busy.
        let mut idle = Backoff::new(mode, 0, IDLE_POLL);
        let mut progress = true;
        loop {
            if stopping.is_none() && signal::stop_requested() {
                stopping = Some(Instant::now());
            }
            if let Some(since) = stopping {
                if state.table.in_use() == 0 {
                    break;
                }
                if since.elapsed() >= STOP_GRACE {
                    state.answer_all(links, ErrorCode::Unavailable, "the balancer is stopping");
                    break;
                }
            }
            let mut wait = idle.round(progress);
            if state.table.in_use() > 0 {
                wait = wait.min(DEADLINE_TICK);
            }
            progress = false;
            match poll.poll(wait.as_millis() as i64) {
                Ok(_) => {}
                Err(e) if e.interrupted() => continue,
                Err(e) => return Err(e.into()),
            }
            // Replies first: they free entries and connection capacity.
            for c in 0..n {
                if poll.readable(1 + c) {
                    progress |= state.forward_replies(links, c, &mut envelope, &mut body)?;
                }
            }
            for c in 0..n {
                if poll.readable(1 + n + c) {
                    progress = true;
                    state.check_liveness(links, c, &mut body)?;
                }
            }
            if stopping.is_none() && poll.readable(0) {
                while recv(&links.frontend, &mut envelope, &mut body)? {
                    progress = true;
                    state.admit(links, &mut envelope, &mut body);
                }
            }
            if state.table.waiting() > 0 {
                state.send_waiting(links);
            }
            if last_tick.elapsed() >= DEADLINE_TICK {
                last_tick = Instant::now();
                state.expire(links, last_tick);
            }
            if !monitor.is_zero() && last_report.elapsed() >= monitor {
                last_report = Instant::now();
                println!("[balancer] {}", format_shares(&state.shares));
            }
            if progress {
                live.publish(&state.counts, state.table.in_use(), state.table.waiting());
            }
        }
        state.counts.dropped = state.slow_peers.total();
        Ok(BalancerReport {
            shares: state.shares.clone(),
            counts: state.counts.clone(),
        })
    }
}

impl State {
    /// A new request: admitted and sent (or queued for a connection), or `Overloaded`.
    fn admit(&mut self, links: &Links, envelope: &mut Envelope, body: &mut Message) {
        self.counts.received += 1;
        let (client, request) = Header::salvage_ids(body.as_slice());
        let deadline = Instant::now() + self.timeout;
        if self.next_expiry.is_none() {
            self.next_expiry = Some(deadline);
        }
        let Some(i) = self.table.admit(envelope, body, client, request, deadline) else {
            self.counts.overloaded += 1;
            log::warn!(
                "client {client} request {request}: {} requests in flight already, answered Overloaded",
                self.table.capacity()
            );
            encode_error(
                &mut self.error_reply,
                client,
                request,
                Task::Echo,
                ErrorCode::Overloaded,
                "the balancer has --max-in-flight requests in flight",
            );
            let head = header_bytes(&self.error_reply);
            if let Err(e) = envelope.send(&links.frontend, &self.error_reply) {
                failed_delivery(&mut self.slow_peers, e, envelope.peer(), &head);
            }
            return;
        };
        // FIFO: nothing overtakes a waiting request.
        if self.table.waiting() > 0 || !self.try_send(links, i) {
            self.table.push_waiting(i);
        }
    }

    /// Sends entry `i` on the least-loaded live connection that takes it; false when none
    /// does (down, its window full, or its queue full).
    fn try_send(&mut self, links: &Links, i: usize) -> bool {
        for (c, conn) in self.conns.iter().enumerate() {
            self.load[c] = if conn.up && conn.outstanding < self.window {
                conn.outstanding
            } else {
                u64::MAX
            };
        }
        for _ in 0..self.conns.len() {
            let Some(c) = pick_least_outstanding(&self.load, self.next) else {
                return false;
            };
            if self.load[c] == u64::MAX {
                return false;
            }
            let ticket = self.table.ticket(i);
            let socket = &links.dealers[c];
            // Refused at the first frame (down or full), nothing is consumed.
            if let Err(e) = socket.send(&ticket, SNDMORE | DONTWAIT) {
                if !e.would_block() {
                    log::error!("backend connection {c}: {e}");
                }
                self.load[c] = u64::MAX;
                continue;
            }
            // Once the first frame is taken, libzmq takes the rest of the message.
            let sent = match self.table.entry_mut(i).body.share() {
                Ok(mut copy) => socket.send_msg(&mut copy, DONTWAIT),
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                // Cannot happen after the first frame; the deadline answers the request.
                log::error!("backend connection {c}: request body not sent: {e}");
            }
            let conn = &mut self.conns[c];
            conn.outstanding += 1;
            self.shares[conn.backend].forwarded += 1;
            self.table.entry_mut(i).place = Place::Sent(c);
            self.next = (c + 1) % self.conns.len();
            return true;
        }
        false
    }

    /// Sends waiting requests, oldest first, while some connection takes them.
    fn send_waiting(&mut self, links: &Links) {
        while let Some(i) = self.table.pop_waiting() {
            if !self.try_send(links, i) {
                self.table.push_waiting_front(i);
                break;
            }
        }
    }

    /// Every reply waiting on connection `c`, delivered to its client (or dropped as late).
    fn forward_replies(
        &mut self,
        links: &Links,
        c: usize,
        envelope: &mut Envelope,
        body: &mut Message,
    ) -> Result<bool, TransportError> {
        let mut any = false;
        while recv(&links.dealers[c], envelope, body)? {
            any = true;
            // The backend echoes the one routing frame it was given: the ticket.
            let found = if envelope.len() == 1 {
                self.table.resolve(envelope.peer(), c)
            } else {
                None
            };
            let Some(i) = found else {
                // Its request timed out and stayed counted on the connection: now it is not.
                let conn = &mut self.conns[c];
                conn.outstanding = conn.outstanding.saturating_sub(1);
                self.counts.late += 1;
                log::debug!("backend connection {c}: late or unknown reply dropped");
                continue;
            };
            let conn = &mut self.conns[c];
            conn.outstanding = conn.outstanding.saturating_sub(1);
            self.shares[conn.backend].answered += 1;
            self.counts.answered += 1;
            let head = header_bytes(body.as_slice());
            let e = self.table.entry_mut(i);
            if let Err(err) = e.envelope.send_msg(&links.frontend, body) {
                failed_delivery(&mut self.slow_peers, err, e.envelope.peer(), &head);
            }
            self.table.release(i);
        }
        Ok(any)
    }

    /// Connection `c`'s monitor events: a loss resends (once) or answers what was on it.
    fn check_liveness(
        &mut self,
        links: &Links,
        c: usize,
        scratch: &mut Message,
    ) -> Result<(), TransportError> {
        let seen = backend::liveness(&links.monitors[c], scratch)?;
        let b = self.conns[c].backend;
        if seen.lost {
            self.shares[b].downs += 1;
            self.conns[c].outstanding = 0;
            let mut lost = std::mem::take(&mut self.scratch);
            lost.clear();
            lost.extend(self.table.sent_on(c));
            log::warn!(
                "backend {} connection {c} lost with {} requests in flight: sending them elsewhere",
                self.shares[b].address,
                lost.len()
            );
            // Oldest first at the FIFO's front: pushed to the front in reverse.
            for &i in lost.iter().rev() {
                self.shares[b].lost += 1;
                let e = self.table.entry_mut(i);
                if e.resent {
                    self.answer(
                        links,
                        i,
                        ErrorCode::Unavailable,
                        "the backend connection was lost twice while this request was on it",
                    );
                } else {
                    e.resent = true;
                    self.counts.resent += 1;
                    self.table.push_waiting_front(i);
                }
            }
            self.scratch = lost;
        }
        if let Some(up) = seen.up {
            if up != self.conns[c].up {
                log::info!(
                    "backend {} connection {c} {}",
                    self.shares[b].address,
                    if up { "up" } else { "down" }
                );
            }
            self.conns[c].up = up;
        }
        Ok(())
    }

    /// Answers every request past its deadline: `Timeout` if a backend has it,
    /// `Unavailable` if no connection could take it.
    fn expire(&mut self, links: &Links, now: Instant) {
        match self.next_expiry {
            Some(at) if at <= now => {}
            _ => return,
        }
        let mut expired = std::mem::take(&mut self.scratch);
        expired.clear();
        expired.extend(self.table.expired(now));
        for &i in &expired {
            match self.table.entry(i).place {
                Place::Sent(c) => {
                    // It stays counted on the connection until its late reply comes or the
                    // connection is lost: a backend that stopped answering keeps its load
                    // and so gets no new requests while another has fewer.
                    let b = self.conns[c].backend;
                    self.shares[b].timed_out += 1;
                    let text = format!(
                        "no reply from backend {} within {} ms",
                        self.shares[b].address,
                        self.timeout.as_millis()
                    );
                    self.answer(links, i, ErrorCode::Timeout, &text);
                }
                Place::Waiting => {
                    self.table.unwait(i);
                    let text = format!(
                        "no backend connection could take the request within {} ms",
                        self.timeout.as_millis()
                    );
                    self.answer(links, i, ErrorCode::Unavailable, &text);
                }
                Place::Free => {}
            }
        }
        self.scratch = expired;
        self.next_expiry = self.table.earliest_deadline();
    }

    /// Answers every admitted request with `code` (at the end of a stop).
    fn answer_all(&mut self, links: &Links, code: ErrorCode, text: &str) {
        let mut all = std::mem::take(&mut self.scratch);
        all.clear();
        all.extend(
            self.table
                .expired(Instant::now() + STOP_GRACE + self.timeout),
        );
        for &i in &all {
            if self.table.entry(i).place == Place::Waiting {
                self.table.unwait(i);
            }
            self.answer(links, i, code, text);
        }
        self.scratch = all;
    }

    /// The balancer's own answer to entry `i` (an error), which ends the entry.
    fn answer(&mut self, links: &Links, i: usize, code: ErrorCode, text: &str) {
        match code {
            ErrorCode::Timeout => self.counts.timed_out += 1,
            ErrorCode::Overloaded => self.counts.overloaded += 1,
            _ => self.counts.unavailable += 1,
        }
        let e = self.table.entry_mut(i);
        log::warn!("client {} request {}: {text}", e.client, e.request);
        encode_error(
            &mut self.error_reply,
            e.client,
            e.request,
            Task::Echo,
            code,
            text,
        );
        let head = header_bytes(&self.error_reply);
        if let Err(err) = e.envelope.send(&links.frontend, &self.error_reply) {
            failed_delivery(&mut self.slow_peers, err, e.envelope.peer(), &head);
        }
        self.table.release(i);
    }
}

fn failed_delivery(slow_peers: &mut SlowPeers, e: ZmqError, peer: &[u8], head: &[u8]) {
    match slow_peers.failed_send(e, peer, head) {
        TransportError::PeerNotReading => {}
        e => log::warn!("reply could not be delivered to its client: {e}"),
    }
}

/// One line of the backends' shares.
pub fn format_shares(shares: &[BackendShare]) -> String {
    let total: u64 = shares.iter().map(|s| s.forwarded).sum::<u64>().max(1);
    shares
        .iter()
        .map(|s| {
            format!(
                "{}: {} forwarded ({:.1}%), {} answered, {} timed out, {} lost, {} downs",
                s.address,
                s.forwarded,
                100.0 * s.forwarded as f64 / total as f64,
                s.answered,
                s.timed_out,
                s.lost,
                s.downs
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The counts line: `received N answered N timeout N unavailable N overloaded N resent N
/// late N dropped N` (every received request is in exactly one of answered, timeout,
/// unavailable and overloaded once the balancer has stopped).
pub fn format_counts(c: &BalancerCounts) -> String {
    format!(
        "received {} answered {} timeout {} unavailable {} overloaded {} resent {} late {} dropped {}",
        c.received, c.answered, c.timed_out, c.unavailable, c.overloaded, c.resent, c.late, c.dropped
    )
}

/// One whole message into `envelope` and `body`; false when nothing is waiting. Messages
/// outside the envelope bounds are dropped by the reader (logged there).
fn recv(s: &Socket, envelope: &mut Envelope, body: &mut Message) -> Result<bool, TransportError> {
    loop {
        match envelope.recv(s, body)? {
            Received::Message => return Ok(true),
            Received::Nothing => return Ok(false),
            Received::Dropped => continue,
        }
    }
}

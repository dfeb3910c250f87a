//! N pipelined RDMA connections to one backend rdma_server.
//!
//! [`RdmaPool`] owns N [`RdmaClient`]s, each with its own ring. A request goes to the live
//! connection with the fewest requests outstanding that has a free slot (up to its ring depth
//! in flight: the connections are pipelined, not closed-loop); when none has, it waits in a
//! FIFO. The caller's token (a ZeroMQ envelope, an inbound RDMA job) is kept per
//! (connection, slot) and handed back with the reply bytes, so every reply reaches the client
//! that sent the request. The message bytes pass through untouched: the protocol header's
//! client and request ids are end-to-end.
//!
//! Faults: a request not answered within the timeout gets `Timeout` from the pool and its
//! slot is kept (the backend may still write the late reply there) until the late reply
//! comes; a connection whose every slot is so abandoned, or that fails, is closed, its
//! requests in flight answered `Unavailable`, and it is reconnected in the background with
//! rdma_client's backoff ([`RECONNECT_FIRST`], doubling). While no connection is up,
//! requests are answered `Unavailable` at once: the proxy never stops for a lost backend.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::balancer::routing::pick_least_outstanding;
use hacserve_ffi::rdma::{PdShare, RegisteredBuf, SlotRing};

use crate::contract::{
    ClientTransport, Lent, LentReply, PollMode, Queued, ServerJob, TransportError,
};
use crate::protocol::{encode_error, ErrorCode, Header, Task};
use crate::transport::rdma::client::{next_reconnect_pause, RECONNECT_FIRST};
use crate::transport::rdma::{RdmaClient, RdmaClientConfig};

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("backend connection {index} to {host}:{port}")]
    Connect {
        index: usize,
        host: String,
        port: u16,
        #[source]
        source: TransportError,
    },
}

/// What the pool forwards: something that lends the request bytes until it is answered.
pub trait ProxyRequest {
    /// The bytes held in memory (the whole message, or only its header when it is lent).
    fn message(&self) -> &[u8];
    /// The whole message where it stayed in a registered ring slot (zero-copy inbound).
    fn lent(&self) -> Option<Lent<'_>> {
        None
    }
}

impl<J: ServerJob> ProxyRequest for Queued<J> {
    fn message(&self) -> &[u8] {
        self.job.message()
    }
    fn lent(&self) -> Option<Lent<'_>> {
        self.job.lent()
    }
}

/// What the pool hands back with a request's token.
pub enum Reply<'a> {
    /// The backend's reply, in the backend connection's response slot (lent for the call):
    /// the sink copies it.
    Backend(&'a [u8]),
    /// The backend's reply with its response slot (zero-copy): the sink may post from it;
    /// the slot takes no other reply until the token is dropped.
    Lent(LentReply),
    /// The pool's own answer (an error it encoded).
    Own(&'a [u8]),
}

/// Backend settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub host: String,
    pub port: u16,
    /// RDMA connections to open.
    pub connections: usize,
    /// Client id announced by connection k in the handshake: `client_id_base + k` (it only
    /// names the connection in the backend's logs; request headers keep their own ids).
    pub client_id_base: u32,
    pub slot_size: u32,
    pub depth: u32,
    /// Connection set-up timeout.
    pub timeout: Duration,
    /// Each request's deadline, from its send.
    pub request_timeout: Duration,
    pub mode: PollMode,
    /// Requests that may wait for a free slot before new ones are answered `Overloaded`.
    pub queue_limit: usize,
    /// Ask the backend for the memory-polled fast path (docs/rdma.md).
    pub fast_path: bool,
    /// Zero-copy forwarding: the backend connections are set up in this shared protection
    /// domain (the inbound side's), requests are posted from where they landed and replies
    /// handed on in their response slots (docs/rdma.md, "Zero-copy rdma_proxy").
    pub pd_share: Option<Arc<PdShare>>,
}

/// Polls between two deadline checks (a clock read each).
const DEADLINE_CHECK_POLLS: u64 = 256;

/// Per-connection counts, printed at exit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnShare {
    pub forwarded: u64,
    pub answered: u64,
    /// In flight when the connection was lost (answered `Unavailable`).
    pub failed: u64,
    /// Answered `Timeout` by the pool.
    pub timed_out: u64,
    /// Replies that came after their request had timed out (dropped).
    pub late: u64,
    /// Times the connection was set up again after a loss.
    pub reconnects: u64,
}

struct Pending<T> {
    token: T,
    client: u32,
    request: u64,
    deadline: Instant,
}

/// One slot of one connection.
enum Slot<T> {
    Idle,
    InFlight(Pending<T>),
    /// Its request timed out and was answered; the backend may still write the reply here
    /// (the connection keeps the slot's credit until the late reply: no request goes into it
    /// before). With zero-copy the request's write may still be reading the inbound ring
    /// slot it was posted from: that ring is kept registered (its memory alive) until the
    /// late reply or the connection's QP is destroyed, so the write never fails on freed
    /// memory. The inbound slot itself is free (its client was answered `Timeout` and may
    /// write it again): at worst the late write carries those newer bytes to the backend,
    /// whose reply is dropped.
    Abandoned {
        _registered: Option<SlotRing<RegisteredBuf>>,
    },
}

/// A lost connection's way back.
enum Reconnect {
    Idle,
    /// Next attempt at the instant, with the backoff after it.
    At(Instant, Duration),
    /// An attempt running on its own thread (set-up blocks up to the timeout).
    Running(JoinHandle<Result<RdmaClient, TransportError>>, Duration),
}

/// N pipelined RDMA connections to one backend.
pub struct RdmaPool<T> {
    cfg: PoolConfig,
    conns: Vec<Option<RdmaClient>>,
    /// `pending[i][slot]`: the request in flight in connection i's slot.
    pending: Vec<Vec<Slot<T>>>,
    reconnect: Vec<Reconnect>,
    waiting: VecDeque<T>,
    shares: Vec<ConnShare>,
    queue_limit: usize,
    next: usize,
    polls: u64,
    load: Vec<u64>,
    error_reply: Vec<u8>,
    /// Replies answered by the pool itself (overload, no backend, too large, backend lost).
    pub local_errors: u64,
    zero_copy: bool,
}

impl<T: ProxyRequest> RdmaPool<T> {
    /// Opens every connection; fails if any cannot be set up (a proxy without its backend
    /// is useless, better to say so at start).
    pub fn connect(cfg: &PoolConfig) -> Result<Self, ProxyError> {
        let mut conns = Vec::with_capacity(cfg.connections);
        let mut pending = Vec::with_capacity(cfg.connections);
        for index in 0..cfg.connections.max(1) {
            let c = connect_one(cfg, index).map_err(|source| ProxyError::Connect {
                index,
                host: cfg.host.clone(),
                port: cfg.port,
                source,
            })?;
            pending.push(idle_slots(&c));
            conns.push(Some(c));
        }
        let n = conns.len();
        Ok(RdmaPool {
            cfg: cfg.clone(),
            conns,
            pending,
            reconnect: (0..n).map(|_| Reconnect::Idle).collect(),
            waiting: VecDeque::new(),
            shares: vec![ConnShare::default(); n],
            queue_limit: cfg.queue_limit,
            next: 0,
            polls: 0,
            load: vec![0; n],
            error_reply: Vec::with_capacity(512),
            local_errors: 0,
            zero_copy: cfg.pd_share.is_some(),
        })
    }

    pub fn shares(&self) -> &[ConnShare] {
        &self.shares
    }

    /// Whether any request is in flight or waiting (abandoned slots are answered already);
    /// stops at the first, since a proxy's loop asks every round.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty()
            || self
                .pending
                .iter()
                .flatten()
                .any(|s| matches!(s, Slot::InFlight(_)))
    }

    pub fn live_connections(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }

    /// Forwards `req` or queues it; `reply` is called at once (with an error reply) when it
    /// can be neither sent nor queued.
    pub fn submit(&mut self, req: T, reply: &mut impl FnMut(T, Reply<'_>)) {
        if !self.waiting.is_empty() {
            // FIFO: earlier requests go first.
            self.enqueue(req, reply);
            self.drain(reply);
            return;
        }
        if let Some(req) = self.try_send(req, reply) {
            self.enqueue(req, reply);
        }
    }

    /// Polls every connection once, hands replies to `reply` and sends waiting requests into
    /// freed slots; now and then answers requests past their deadline and tends lost
    /// connections. Returns how many replies arrived (0: idle).
    pub fn poll(&mut self, reply: &mut impl FnMut(T, Reply<'_>)) -> usize {
        self.polls += 1;
        let check_cm = self.polls % 1024 == 0;
        let mut got = 0;
        for i in 0..self.conns.len() {
            let mut failed: Option<String> = None;
            if let Some(conn) = self.conns[i].as_mut() {
                loop {
                    let (slot, bytes) = if self.zero_copy {
                        match conn.try_recv_lent() {
                            Ok(Some((slot, lent))) => (slot, Reply::Lent(lent)),
                            Ok(None) => break,
                            Err(e) => {
                                failed = Some(e.to_string());
                                break;
                            }
                        }
                    } else {
                        match conn.try_recv() {
                            Ok(Some((slot, bytes))) => (slot, Reply::Backend(bytes)),
                            Ok(None) => break,
                            Err(e) => {
                                failed = Some(e.to_string());
                                break;
                            }
                        }
                    };
                    got += 1;
                    let state = self.pending[i]
                        .get_mut(slot as usize)
                        .map(|s| std::mem::replace(s, Slot::Idle));
                    match state {
                        Some(Slot::InFlight(p)) => {
                            self.shares[i].answered += 1;
                            reply(p.token, bytes);
                        }
                        // Dropped (a lent slot goes back to its connection).
                        Some(Slot::Abandoned { .. }) => self.shares[i].late += 1,
                        // Cannot happen: try_recv checks the slot is in flight.
                        _ => log::error!("connection {i}: reply for idle slot {slot}"),
                    }
                }
                if failed.is_none() && check_cm {
                    if let Err(e) = conn.poll_disconnect() {
                        failed = Some(e.to_string());
                    }
                }
            }
            if let Some(why) = failed {
                self.fail_connection(i, &why, reply);
            }
        }
        if self.polls % DEADLINE_CHECK_POLLS == 0 {
            self.expire(Instant::now(), reply);
            self.tend_reconnects();
        }
        self.drain(reply);
        got
    }

    /// Answers `Timeout` to requests past their deadline; a connection with abandoned slots
    /// and none in flight has stopped answering (its slots are used in turn, so the first
    /// abandoned one blocks it for good) and is closed (to be set up again).
    fn expire(&mut self, now: Instant, reply: &mut impl FnMut(T, Reply<'_>)) {
        for i in 0..self.conns.len() {
            let mut in_flight = false;
            let mut abandoned = false;
            for s in 0..self.pending[i].len() {
                let expired = matches!(&self.pending[i][s], Slot::InFlight(p) if p.deadline <= now);
                if expired {
                    let Slot::InFlight(p) = std::mem::replace(
                        &mut self.pending[i][s],
                        Slot::Abandoned { _registered: None },
                    ) else {
                        continue;
                    };
                    abandoned = true;
                    // The request's write may still read the ring it was posted from.
                    self.pending[i][s] = Slot::Abandoned {
                        _registered: p.token.lent().map(|l| l.token.ring()),
                    };
                    self.shares[i].timed_out += 1;
                    let text = format!(
                        "no reply from the backend within {} ms",
                        self.cfg.request_timeout.as_millis()
                    );
                    self.answer(p, ErrorCode::Timeout, &text, reply);
                } else {
                    match self.pending[i][s] {
                        Slot::InFlight(_) => in_flight = true,
                        Slot::Abandoned { .. } => abandoned = true,
                        Slot::Idle => {}
                    }
                }
            }
            if abandoned && !in_flight && self.conns[i].is_some() {
                self.fail_connection(
                    i,
                    "every slot timed out: the backend stopped answering",
                    reply,
                );
            }
        }
    }

    /// Starts due reconnection attempts and takes back finished ones.
    fn tend_reconnects(&mut self) {
        let now = Instant::now();
        for i in 0..self.conns.len() {
            let state = std::mem::replace(&mut self.reconnect[i], Reconnect::Idle);
            self.reconnect[i] = match state {
                Reconnect::At(when, backoff) if when <= now => {
                    let cfg = self.cfg.clone();
                    match std::thread::Builder::new()
                        .name(format!("reconnect-{i}"))
                        .spawn(move || connect_one(&cfg, i))
                    {
                        Ok(h) => Reconnect::Running(h, backoff),
                        Err(e) => {
                            log::error!("backend connection {i}: no thread to reconnect: {e}");
                            Reconnect::At(now + backoff, next_reconnect_pause(backoff))
                        }
                    }
                }
                Reconnect::Running(h, backoff) if h.is_finished() => match h.join() {
                    Ok(Ok(c)) => {
                        log::info!("backend connection {i} set up again");
                        self.shares[i].reconnects += 1;
                        self.pending[i] = idle_slots(&c);
                        self.conns[i] = Some(c);
                        Reconnect::Idle
                    }
                    Ok(Err(e)) => {
                        log::warn!(
                            "backend connection {i}: reconnecting failed ({e}); next try in {} ms",
                            backoff.as_millis()
                        );
                        Reconnect::At(now + backoff, next_reconnect_pause(backoff))
                    }
                    Err(_) => Reconnect::At(now + backoff, next_reconnect_pause(backoff)),
                },
                other => other,
            };
        }
    }

    /// Closes connection `i`, answers its requests in flight with `Unavailable` errors and
    /// schedules its reconnection.
    fn fail_connection(&mut self, i: usize, why: &str, reply: &mut impl FnMut(T, Reply<'_>)) {
        log::error!("backend connection {i} lost: {why}");
        self.conns[i] = None;
        let text = format!("the proxy lost its backend connection: {why}");
        let slots = std::mem::take(&mut self.pending[i]);
        for slot in slots {
            if let Slot::InFlight(p) = slot {
                self.shares[i].failed += 1;
                self.answer(p, ErrorCode::Unavailable, &text, reply);
            }
        }
        if matches!(self.reconnect[i], Reconnect::Idle) {
            self.reconnect[i] = Reconnect::At(
                Instant::now() + RECONNECT_FIRST,
                next_reconnect_pause(RECONNECT_FIRST),
            );
        }
    }

    /// The pool's own answer to a request it had sent.
    fn answer(
        &mut self,
        p: Pending<T>,
        code: ErrorCode,
        text: &str,
        reply: &mut impl FnMut(T, Reply<'_>),
    ) {
        self.local_errors += 1;
        log::warn!("client {} request {}: {text}", p.client, p.request);
        encode_error(
            &mut self.error_reply,
            p.client,
            p.request,
            Task::Echo,
            code,
            text,
        );
        reply(p.token, Reply::Own(&self.error_reply));
    }

    fn refuse(
        &mut self,
        req: T,
        code: ErrorCode,
        text: &str,
        reply: &mut impl FnMut(T, Reply<'_>),
    ) {
        let (client, request) = Header::salvage_ids(req.message());
        self.local_errors += 1;
        encode_error(
            &mut self.error_reply,
            client,
            request,
            Task::Echo,
            code,
            text,
        );
        reply(req, Reply::Own(&self.error_reply));
    }

    fn enqueue(&mut self, req: T, reply: &mut impl FnMut(T, Reply<'_>)) {
        if self.waiting.len() >= self.queue_limit {
            self.refuse(
                req,
                ErrorCode::Overloaded,
                "the proxy's queue is full",
                reply,
            );
        } else {
            self.waiting.push_back(req);
        }
    }

    fn drain(&mut self, reply: &mut impl FnMut(T, Reply<'_>)) {
        while let Some(req) = self.waiting.pop_front() {
            if let Some(req) = self.try_send(req, reply) {
                self.waiting.push_front(req);
                break;
            }
        }
    }

    /// Sends into the least-loaded connection with a free slot; gives the request back when
    /// every connection is full. Answers it itself when it cannot be forwarded at all.
    fn try_send(&mut self, req: T, reply: &mut impl FnMut(T, Reply<'_>)) -> Option<T> {
        if self.live_connections() == 0 {
            self.refuse(
                req,
                ErrorCode::Unavailable,
                "the proxy has no backend connection up (reconnecting)",
                reply,
            );
            return None;
        }
        let len = req.lent().map_or(req.message().len(), |l| l.len);
        let fits = self.conns.iter().flatten().any(|c| len <= c.slot_size());
        if !fits {
            let text =
                format!("request of {len} bytes exceeds the proxy's RDMA slot (--slot-size)");
            self.refuse(req, ErrorCode::PayloadTooLarge, &text, reply);
            return None;
        }
        for (i, c) in self.conns.iter().enumerate() {
            self.load[i] = match c {
                Some(c) if c.can_send() => c.outstanding() as u64,
                _ => u64::MAX,
            };
        }
        let i = pick_least_outstanding(&self.load, self.next)?;
        if self.load[i] == u64::MAX {
            return Some(req);
        }
        self.next = (i + 1) % self.conns.len();
        let conn = self.conns[i].as_mut()?;
        let slot = conn.next_slot() as usize;
        let (client, request) = Header::salvage_ids(req.message());
        let sent = match req.lent() {
            Some(lent) => conn.send_lent(lent).map(|_| ()),
            None => conn.send(req.message()),
        };
        match sent {
            Ok(()) => {
                self.shares[i].forwarded += 1;
                self.pending[i][slot] = Slot::InFlight(Pending {
                    token: req,
                    client,
                    request,
                    deadline: Instant::now() + self.cfg.request_timeout,
                });
                None
            }
            Err(e) => {
                let why = e.to_string();
                self.fail_connection(i, &why, reply);
                // Another connection may still take it.
                self.try_send(req, reply)
            }
        }
    }
}

fn connect_one(cfg: &PoolConfig, index: usize) -> Result<RdmaClient, TransportError> {
    RdmaClient::connect_in(
        &cfg.host,
        cfg.port,
        RdmaClientConfig {
            client_id: cfg.client_id_base.wrapping_add(index as u32),
            slot_size: cfg.slot_size,
            depth: cfg.depth,
            timeout: cfg.timeout,
            // The forwarder polls its connections without blocking on any one of them
            // (try_recv), whatever its own idle rule: no completion channel for them.
            mode: match cfg.mode {
                PollMode::Event => PollMode::Block,
                m => m,
            },
            // The proxy's backend connections are the server's clients.
            total_clients: cfg.connections as u32,
            fast_path: cfg.fast_path,
        },
        cfg.pd_share.clone(),
    )
}

fn idle_slots<T>(c: &RdmaClient) -> Vec<Slot<T>> {
    (0..c.depth()).map(|_| Slot::Idle).collect()
}

/// One line of per-connection counts.
pub fn format_shares(shares: &[ConnShare]) -> String {
    shares
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "conn {i}: {} forwarded, {} answered, {} failed, {} timed out, {} late, {} reconnects",
                s.forwarded, s.answered, s.failed, s.timed_out, s.late, s.reconnects
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

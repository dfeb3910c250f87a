//! The RDMA server transport, driven by the serving core: one receive loop owns every
//! established connection's completion queue; a connection-manager thread
//! ([`super::conn_manager`]) sets connections up, hands them over and frees them. A request
//! completion names its slot and length in the immediate; [`RdmaServer`] checks both (a
//! client breaking the ring rules is disconnected), claims the slot, copies the request out
//! of the remote-writable landing ring into the connection's private copy slot of that
//! index (with a GPU ring only its header: the payload stays in GPU memory, see
//! [`super::gpu_ring`]) and hands the core an [`RdmaJob`] that reads only the copy. Replies are staged in
//! the connection's staging slot of the same index and written into the client's response
//! slot of that index, from the loop (echoes, rejections) or straight from a worker's
//! [`RdmaReplySink`] (posting is thread-safe). The loop also watches every connection's
//! reply writes: one left unacknowledged beyond the peer timeout gets the client
//! disconnected.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hacserve_ffi::gpu::cuda::cu;
use hacserve_ffi::rdma::{
    CmId, EventChannel, EventWait, HostBuf, PdShare, Rdma, RegisteredBuf, SlotToken, WcOpcode,
    WcStatus, WorkCompletion,
};

use crossbeam_queue::ArrayQueue;

use super::admission::{registered_bytes, Admission};
use super::conn::ServerConn;
use super::conn_manager::{gpu_conn, ConnManager, SetupRules};
use super::gpu_ring::loopback::LoopbackGpuRing;
use super::wire::*;
use crate::clock::realtime_ns;
use crate::contract::copies::count_payload_copy;
use crate::contract::{
    Counters, InLoop, Lent, LentReply, ReplySink, Resident, ServerJob, ServerTransport,
    TransportError,
};
use crate::protocol::{ReplyBuffer, HEADER_LEN};

/// Idle receive loop in block mode: empty rounds before it sleeps, and the sleep (no
/// completion channel yet), longer while no client is connected.
const IDLE_SPINS: u32 = 64;
const IDLE_SLEEP: Duration = Duration::from_micros(50);
const IDLE_SLEEP_NO_CLIENT: Duration = Duration::from_millis(2);
/// Event mode: the longest sleep on the completion channels before the loop looks at new
/// connections, liveness and the stop flag again (a completion wakes it at once).
const EVENT_TICK: Duration = Duration::from_millis(20);
/// Rounds between two looks at the manager's hand-off queue while busy (a look is two
/// atomic loads; every round while idle or without clients).
const HANDOFF_EVERY: u64 = 64;
/// Rounds between two liveness checks (one clock read each).
const LIVENESS_EVERY: u64 = 1024;
/// At shutdown: poll for the last replies' completions until quiet this long, at most
/// SHUTDOWN_MAX, before disconnecting (a disconnect flushes sends still queued).
const SHUTDOWN_QUIET: Duration = Duration::from_millis(20);
const SHUTDOWN_MAX: Duration = Duration::from_millis(500);

/// A request, copied out of the client's ring into the connection's copy slot.
pub struct RdmaJob {
    conn: Arc<ServerConn>,
    /// Holds the request's copy slot until the reply is staged (or the job is dropped, even
    /// by a panicking worker): the client's credit for that slot, on the server side.
    req: SlotToken<HostBuf>,
    /// Bytes of the slot that hold the request (at most the slot).
    len: u32,
    /// The length the immediate announced when it exceeded the slot.
    announced: Option<u32>,
    /// Payload bytes left in the GPU ring slot (GPU-resident request; `len` is then the
    /// header alone).
    resident: u32,
    /// Zero-copy (a proxy's inbound side): the landing slot the whole request stays in,
    /// where it starts and its length (`len` is then the header alone).
    landing: Option<(SlotToken<RegisteredBuf>, u32, u32)>,
    received: u64,
}

impl ServerJob for RdmaJob {
    fn message(&self) -> &[u8] {
        self.conn.request(&self.req, self.len as usize)
    }
    fn received_ns(&self) -> u64 {
        self.received
    }
    fn payload_limit(&self) -> Option<usize> {
        Some(self.conn.usable - HEADER_LEN)
    }
    fn resident(&self) -> Option<Resident<'_>> {
        if self.resident == 0 {
            return None;
        }
        self.conn.resident(self.req.slot(), self.resident as usize)
    }
    fn lent(&self) -> Option<Lent<'_>> {
        let (token, at, len) = self.landing.as_ref()?;
        Some(Lent {
            token,
            at: *at as usize,
            len: *len as usize,
        })
    }
    fn oversize(&self) -> Option<String> {
        self.announced.map(|len| {
            format!(
                "immediate length {len} exceeds the {}-byte slot",
                self.conn.usable
            )
        })
    }
}

/// A worker's way back: stage the reply and write it to the client (posting a send is
/// thread-safe, so workers post on the client's QP directly).
#[derive(Default)]
pub struct RdmaReplySink;

impl ReplySink<RdmaJob> for RdmaReplySink {
    fn reply(&mut self, job: RdmaJob, reply: &[u8]) -> Result<(), TransportError> {
        let written = job.conn.reply_with(job.req, 0, |_, w| {
            let out = w.prepare(reply.len());
            let n = out.len();
            out.copy_from_slice(&reply[..n]);
            Some(())
        });
        written.map_or(Ok(()), |(_, _, sent)| sent)
    }

    /// Zero-copy where the connection shares the reply slot's protection domain: posted
    /// from the backend response slot itself; else copied like any reply (counted).
    fn reply_lent(&mut self, job: RdmaJob, reply: LentReply) -> Result<(), TransportError> {
        let RdmaJob {
            conn,
            req,
            len,
            announced,
            resident,
            landing,
            received,
        } = job;
        // The request's landing slot is free once the reply is on its way.
        drop(landing);
        match conn.post_lent_reply(req, reply) {
            Ok(sent) => sent,
            Err((req, reply)) => {
                count_payload_copy();
                let job = RdmaJob {
                    conn,
                    req,
                    len,
                    announced,
                    resident,
                    landing: None,
                    received,
                };
                self.reply(job, reply.bytes())
            }
        }
    }
}

/// Limits and behaviour of the listening side.
#[derive(Debug, Clone)]
pub struct RdmaServerConfig {
    /// Largest request slot a client may ask for.
    pub max_slot_size: u32,
    /// Largest ring depth a client may ask for.
    pub max_depth: u32,
    /// Connections held at once (set up, serving, or closed but not yet freed); more are
    /// refused with the reason.
    pub max_connections: u32,
    /// Memory the connections' rings may register in all (see
    /// [`super::admission::registered_bytes`]); a connection beyond it is refused.
    pub max_pinned_bytes: u64,
    /// A connection whose reply writes stay unacknowledged this long (without any
    /// completing) is disconnected; None = never.
    pub peer_timeout: Option<Duration>,
    /// Keep serving after the last client left (false: stop once every client that connected
    /// has disconnected).
    pub keep_alive: bool,
    /// Where request rings live: host memory, or (GPUDirect RDMA, `-a 1`) GPU memory.
    pub addressing: Addressing,
    /// Grant the memory-polled fast path to clients that ask (`--fast-path on`; never with
    /// `events` or GPU addressing).
    pub fast_path: bool,
    /// `--poll-mode event`: the idle receive loop sleeps on the connections' completion
    /// channels instead of in timed steps.
    pub events: bool,
    /// Host addressing with a GPU backend: each connection's request copy ring (where the
    /// engine reads requests from) is registered with this CUDA context, so uploads of
    /// processed and raw payloads are DMA straight from it; None (or a failed
    /// registration, logged and counted) keeps plain memory.
    pub host_ring_cuda: Option<Arc<cu::CudaContext>>,
}

/// A proxy's inbound side in zero-copy mode: every connection is set up in `pd` (shared
/// with the proxy's backend connections), and requests stay in the landing ring for the
/// forwarder to post from.
#[derive(Debug, Clone)]
pub struct ZeroCopy {
    pub pd: Arc<PdShare>,
}

/// rdma_server's defaults for the entry limits (docs/rdma.md says why).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;
pub const DEFAULT_MAX_PINNED_MIB: u64 = 4096;
/// Above RC's own give-up (retry_count 7 at rdma_cm's ~1 s RoCE ack timeout: ~8 s), so a
/// lossy but live link is left to RC's retransmissions (docs/rdma.md, "Peers that stop
/// taking replies").
pub const DEFAULT_PEER_TIMEOUT_MS: u64 = 15000;

/// Where the server places each client's request ring.
#[derive(Debug, Clone, Default)]
pub enum Addressing {
    #[default]
    Host,
    /// On this GPU: clients' RDMA writes land in device memory (registered through dma-buf,
    /// else nvidia-peermem). The receive loop copies only each request's header into the
    /// host copy slot; the payload stays in GPU memory for the engine ([`Resident`]) and the
    /// reply's body goes out from a device reply ring.
    Gpu(GpuRing),
}

/// The GPU that holds the request rings, and the stream (from the inference backend, which
/// owns the device contexts) the rings are allocated and read on.
#[derive(Clone)]
pub struct GpuRing {
    pub ordinal: usize,
    pub stream: Arc<cu::CudaStream>,
}

impl std::fmt::Debug for GpuRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GPU {}", self.ordinal)
    }
}

/// A connection as the receive loop holds it, with its liveness state.
struct LoopConn {
    conn: Arc<ServerConn>,
    /// Reply completions seen at the last liveness check.
    last_done: u64,
    /// Since when replies have been outstanding without one completing.
    stalled_since: Option<Instant>,
    /// Fast path: the slot the client's next request goes into (clients fill slots
    /// round-robin), whose completion word the loop watches.
    cursor: u32,
}

/// The serving side: the established connections, polled by the receive loop, and the
/// connection manager that sets them up.
pub struct RdmaServer {
    addr: SocketAddr,
    cfg: RdmaServerConfig,
    /// None for a loopback server (its one connection is made at start).
    manager: Option<ConnManager>,
    /// Established connections from the manager.
    incoming: Arc<ArrayQueue<Arc<ServerConn>>>,
    admission: Arc<Admission>,
    conns: Vec<LoopConn>,
    /// Whether any client has connected (for keep-alive off).
    served_any: bool,
    /// The largest run size (`rdma_client -c`) a client declared: 0 = none connected.
    total_clients: u32,
    /// Request completions taken from the CQs, waiting for `next_request`.
    ready: VecDeque<RdmaJob>,
    /// The receives of the jobs in `ready` (same order), reposted one by one once the loop
    /// has answered or queued the job: off the reply's critical path, yet before the client's
    /// next request needs one (depth + 1 are posted, the spare takes a request in between; a
    /// client finding none would stall on RNR retries).
    repost: VecDeque<(Arc<ServerConn>, Option<u64>)>,
    /// Event mode's wait on every connection's completion channel (preallocated).
    waiter: EventWait,
    /// Jobs handed to the loop whose receives are not reposted yet.
    handed_out: usize,
    wcs: [WorkCompletion; 32],
    rounds: u64,
    dead: Vec<usize>,
}

impl RdmaServer {
    /// Loads the RDMA libraries, checks for a device, listens on `addr` (port 0 = any) and
    /// starts the connection manager. Clients are told `max_payload` (or their slot, if
    /// smaller) as their payload limit.
    pub fn listen(
        addr: SocketAddr,
        cfg: RdmaServerConfig,
        max_payload: usize,
    ) -> Result<Self, TransportError> {
        Self::listen_with(addr, cfg, max_payload, None)
    }

    /// [`Self::listen`], with `zero_copy`: a proxy's inbound side whose connections share
    /// a protection domain with its backend connections (docs/rdma.md, "Zero-copy
    /// rdma_proxy").
    pub fn listen_with(
        addr: SocketAddr,
        cfg: RdmaServerConfig,
        max_payload: usize,
        zero_copy: Option<ZeroCopy>,
    ) -> Result<Self, TransportError> {
        let rdma = Rdma::load()?;
        let gpu_stream: Option<Arc<cu::CudaStream>> = match &cfg.addressing {
            Addressing::Host => None,
            Addressing::Gpu(ring) => Some(ring.stream.clone()),
        };
        let channel = EventChannel::new(rdma)?;
        let listener = CmId::new(rdma, &channel)?;
        let port = listener.listen(&addr, 64)?;
        let mut addr = addr;
        addr.set_port(port);
        let admission = Admission::new(cfg.max_connections, cfg.max_pinned_bytes);
        let rules = SetupRules {
            max_slot_size: cfg.max_slot_size,
            max_depth: cfg.max_depth,
            gpu_stream,
            max_payload,
            fast_path: cfg.fast_path,
            events: cfg.events,
            pd_share: zero_copy.map(|z| z.pd),
            host_cuda: match cfg.addressing {
                Addressing::Host => cfg.host_ring_cuda.clone(),
                Addressing::Gpu(_) => None,
            },
        };
        let manager = ConnManager::start(
            rdma,
            channel,
            listener,
            rules,
            admission.clone(),
            cfg.max_connections,
        )?;
        let incoming = manager.incoming.clone();
        Ok(Self::around(addr, cfg, Some(manager), incoming, admission))
    }

    /// A server whose one connection is a loopback GPU ring (no NIC, no rdma_cm): `ring`
    /// carries requests written into GPU memory by device copies, and the server serves them
    /// through exactly the GPU-ring path `-a 1` uses over verbs. For the GPU test and
    /// benchmark on machines without an RDMA device.
    pub fn loopback(
        cfg: RdmaServerConfig,
        ring: LoopbackGpuRing,
        client_id: u32,
    ) -> Result<Self, TransportError> {
        let admission = Admission::new(cfg.max_connections, cfg.max_pinned_bytes);
        let (depth, slot_size) = (ring.depth(), ring.slot_size());
        let req = ConnectRequest {
            flags: 0,
            client_id,
            slot_size: slot_size as u32,
            depth,
            resp_slot_size: ring.resp_slot_size() as u32,
            resp_addr: 0,
            resp_rkey: 0,
            total_clients: 1,
        };
        let reservation = admission
            .admit(client_id, registered_bytes(depth, req.slot_size))
            .map_err(TransportError::Refused)?;
        let conn = gpu_conn(Box::new(ring), &req, reservation)?;
        // depth + 1 receives, as the connection manager posts them for verbs.
        for i in 0..=depth {
            conn.rearm(i as u64)?;
        }
        let incoming = Arc::new(ArrayQueue::new(1));
        let _ = incoming.push(Arc::new(conn));
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        Ok(Self::around(addr, cfg, None, incoming, admission))
    }

    fn around(
        addr: SocketAddr,
        cfg: RdmaServerConfig,
        manager: Option<ConnManager>,
        incoming: Arc<ArrayQueue<Arc<ServerConn>>>,
        admission: Arc<Admission>,
    ) -> Self {
        let cap = cfg.max_connections.clamp(1, 1024) as usize;
        RdmaServer {
            addr,
            cfg,
            manager,
            incoming,
            admission,
            conns: Vec::with_capacity(cap),
            served_any: false,
            total_clients: 0,
            ready: VecDeque::with_capacity(256),
            repost: VecDeque::with_capacity(256),
            waiter: EventWait::with_capacity(cap),
            handed_out: 0,
            wcs: [WorkCompletion::default(); 32],
            rounds: 0,
            dead: Vec::with_capacity(16),
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of clients the receive loop serves.
    pub fn clients(&self) -> usize {
        self.conns.len()
    }

    /// "x of y connections, a of b MiB pinned".
    pub fn usage(&self) -> String {
        self.admission.usage()
    }

    /// Takes the connections the manager has established.
    fn take_new_conns(&mut self) {
        while let Some(conn) = self.incoming.pop() {
            self.total_clients = self.total_clients.max(conn.total_clients);
            self.conns.push(LoopConn {
                conn,
                last_done: 0,
                stalled_since: None,
                cursor: 0,
            });
            self.served_any = true;
        }
    }

    /// Marks every connection whose reply writes have been outstanding, none completing,
    /// for longer than the peer timeout.
    fn check_liveness(&mut self) {
        let Some(timeout) = self.cfg.peer_timeout else {
            return;
        };
        let now = Instant::now();
        for (i, lc) in self.conns.iter_mut().enumerate() {
            let done = lc.conn.replies_done.load(Ordering::Relaxed);
            let waiting = lc.conn.replies_unacknowledged();
            if waiting == 0 || done != lc.last_done {
                lc.last_done = done;
                lc.stalled_since = None;
                continue;
            }
            let since = *lc.stalled_since.get_or_insert(now);
            let stalled = now.duration_since(since);
            if stalled >= timeout && lc.conn.is_alive() {
                log::warn!(
                    "client {}: {waiting} replies unacknowledged for {} ms (--peer-timeout-ms {}): it is not taking its replies; disconnecting it",
                    lc.conn.client_id,
                    stalled.as_millis(),
                    timeout.as_millis()
                );
                self.dead.push(i);
            }
        }
    }

    /// Removes connection `i` from the loop: disconnects it if it is still up (the server's
    /// decision, whose reason was logged), counts the replies it never acknowledged as
    /// undeliverable, and lets the manager free it once no job holds it.
    fn retire(&mut self, i: usize, counters: &Counters) {
        let lc = self.conns.swap_remove(i);
        let c = &lc.conn;
        if c.close() {
            log::warn!("client {} disconnected by the server", c.client_id);
        }
        let lost = c.replies_unacknowledged();
        if lost > 0 {
            counters.transport_errors.fetch_add(lost, Ordering::Relaxed);
            log::warn!(
                "client {}: {lost} replies posted but never acknowledged, counted undeliverable",
                c.client_id
            );
        }
    }

    /// Reposts the receives of the jobs handed out so far.
    fn repost_handed_out(&mut self) {
        for _ in 0..std::mem::take(&mut self.handed_out) {
            let Some((conn, wr_id)) = self.repost.pop_front() else {
                break;
            };
            // A fast-path request consumed no receive.
            let Some(wr_id) = wr_id else {
                continue;
            };
            if !conn.alive.load(Ordering::Acquire) {
                continue;
            }
            if let Err(e) = conn.rearm(wr_id) {
                log::error!("client {}: reposting a receive: {e}", conn.client_id);
                conn.alive.store(false, Ordering::Release);
            }
        }
    }

    /// Turns one successful receive completion into a job; Err(reason) when the client
    /// broke the ring rules and must be disconnected.
    fn take_request(conn: &Arc<ServerConn>, wc: &WorkCompletion) -> Result<RdmaJob, String> {
        let imm = wc.imm().ok_or("write without an immediate")?;
        let (slot, len) = decode_imm(imm);
        if slot >= conn.depth {
            return Err(format!(
                "immediate names slot {slot} of a {}-slot ring",
                conn.depth
            ));
        }
        let job = Self::take_slot(conn, slot, len, false)?;
        if job.announced.is_some() {
            // It may have written over the slot's completion word.
            conn.clear_word(slot);
        }
        Ok(job)
    }

    /// The request of `len` bytes in landing slot `slot`, copied out: from the slot's start
    /// (WRITE_WITH_IMM), or (`fast`) from right before the completion word, where the fast
    /// path places a message.
    fn take_slot(
        conn: &Arc<ServerConn>,
        slot: u32,
        len: u32,
        fast: bool,
    ) -> Result<RdmaJob, String> {
        let Some(mut req) = conn.copy.claim(slot) else {
            return Err(format!(
                "request into slot {slot} while it is still being served (no credit)"
            ));
        };
        conn.count_request(slot);
        // Beyond the slot the length cannot be right: only the header is read.
        let oversize = len as usize > conn.usable;
        let wanted = if oversize { HEADER_LEN as u32 } else { len };
        let from = if fast && !oversize {
            conn.usable - len as usize
        } else {
            0
        };
        if conn.zero_copy && !oversize && wanted as usize >= HEADER_LEN {
            // The request stays where it landed; only its header is copied, for the core
            // to read bytes the client can no longer change.
            let Some(landing) = conn.claim_landing(slot) else {
                return Err(format!("landing slot {slot} is still held (no credit)"));
            };
            let dst = &mut req.bytes_mut()[..HEADER_LEN];
            if landing.copy_out_at(from, dst) != HEADER_LEN {
                return Err(format!("slot {slot}: header at {from} outside the slot"));
            }
            return Ok(RdmaJob {
                conn: conn.clone(),
                req,
                len: HEADER_LEN as u32,
                announced: None,
                resident: 0,
                landing: Some((landing, from as u32, len)),
                received: realtime_ns(),
            });
        }
        let held = match conn.copy_request(&mut req, wanted as usize, from) {
            Ok(held) => held as u32,
            Err(e) => {
                return Err(format!(
                    "copying the request out of slot {slot} failed ({e})"
                ))
            }
        };
        if conn.gpu().is_none() && held as usize > HEADER_LEN {
            count_payload_copy();
        }
        Ok(RdmaJob {
            conn: conn.clone(),
            req,
            len: held,
            announced: oversize.then_some(len),
            resident: wanted - held,
            landing: None,
            received: realtime_ns(),
        })
    }
}

impl RdmaServer {
    /// One look at every connection: fast-path completion words first (the slot each
    /// client writes next), then its CQ (WRITE_WITH_IMM requests, reply completions).
    /// Requests go to `ready`, connections to drop to `dead`; returns the events seen.
    fn poll_conns(&mut self, counters: &Counters) -> usize {
        let mut events = 0;
        for (ci, lc) in self.conns.iter_mut().enumerate() {
            let conn = &lc.conn;
            if !conn.alive.load(Ordering::Acquire) {
                self.dead.push(ci);
                continue;
            }
            if conn.fast {
                // At most a ring's worth per round, so one client cannot hold the loop.
                for _ in 0..conn.depth {
                    let Some(len) = conn.poll_fast(lc.cursor) else {
                        break;
                    };
                    match Self::take_slot(conn, lc.cursor, len, true) {
                        Ok(job) => {
                            events += 1;
                            self.ready.push_back(job);
                            self.repost.push_back((conn.clone(), None));
                            lc.cursor = (lc.cursor + 1) % conn.depth;
                        }
                        Err(why) => {
                            log::warn!("client {}: {why}; disconnecting it", conn.client_id);
                            self.dead.push(ci);
                            break;
                        }
                    }
                }
            }
            let n = match conn.poll(&mut self.wcs) {
                Ok(n) => n,
                Err(e) => {
                    log::error!("client {}: polling failed: {e}", conn.client_id);
                    self.dead.push(ci);
                    continue;
                }
            };
            events += n;
            for wc in &self.wcs[..n] {
                if wc.status() != WcStatus::Success {
                    if wc.status() != WcStatus::WrFlushErr && conn.alive.load(Ordering::Acquire) {
                        log::warn!(
                            "client {}: work completion failed: {}; disconnecting it",
                            conn.client_id,
                            conn.status_text(wc.status())
                        );
                    }
                    counters.transport_errors.fetch_add(1, Ordering::Relaxed);
                    self.dead.push(ci);
                    break;
                }
                if wc.opcode() != WcOpcode::RecvRdmaWithImm {
                    // A reply's write completed: the client took it. Only this loop counts.
                    let done = conn.replies_done.load(Ordering::Relaxed);
                    conn.replies_done.store(done + 1, Ordering::Relaxed);
                    conn.release_lent(wc.wr_id());
                    continue;
                }
                match Self::take_request(conn, wc) {
                    Ok(job) => {
                        // The client's next request goes into the slot after this one.
                        lc.cursor = (job.req.slot() + 1) % conn.depth;
                        self.ready.push_back(job);
                        self.repost.push_back((conn.clone(), Some(wc.wr_id())));
                    }
                    Err(why) => {
                        log::warn!("client {}: {why}; disconnecting it", conn.client_id);
                        self.dead.push(ci);
                        break;
                    }
                }
            }
        }
        events
    }
}

impl ServerTransport for RdmaServer {
    type Job = RdmaJob;
    type Sink = RdmaReplySink;

    fn reply_sink(&mut self) -> Result<RdmaReplySink, TransportError> {
        Ok(RdmaReplySink)
    }

    fn idle_wait(&self) -> (u32, Duration) {
        let sleep = if self.conns.is_empty() {
            IDLE_SLEEP_NO_CLIENT
        } else if self.cfg.events {
            EVENT_TICK
        } else {
            IDLE_SLEEP
        };
        (IDLE_SPINS, sleep)
    }

    fn poll(&mut self, wait: Duration, counters: &Counters) -> Result<usize, TransportError> {
        self.repost_handed_out();
        self.rounds += 1;
        if self.rounds % HANDOFF_EVERY == 0 || self.conns.is_empty() || !wait.is_zero() {
            self.take_new_conns();
        }
        // Event mode: arm every CQ, poll them once more below (a completion that came before
        // its arm raises no event), and only when that finds nothing sleep on the channels.
        let on_events = !wait.is_zero() && self.cfg.events && !self.conns.is_empty();
        if on_events {
            for lc in &self.conns {
                if let Err(e) = lc.conn.arm() {
                    log::error!("client {}: arming its CQ: {e}", lc.conn.client_id);
                    lc.conn.alive.store(false, Ordering::Release);
                }
            }
        } else if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        self.dead.clear();
        // Every LIVENESS_EVERY busy rounds, and after every idle sleep (where one clock
        // read is nothing next to the sleep).
        if self.rounds % LIVENESS_EVERY == 0 || !wait.is_zero() {
            self.check_liveness();
        }
        let mut events = self.poll_conns(counters);
        if on_events && events == 0 && self.dead.is_empty() {
            self.waiter.clear();
            for lc in &self.conns {
                lc.conn.add_to(&mut self.waiter);
            }
            let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
            if let Err(e) = self.waiter.wait(ms) {
                log::error!("waiting for completion events: {e}");
                std::thread::sleep(wait);
            }
            for lc in &self.conns {
                if let Err(e) = lc.conn.take_events() {
                    log::error!("client {}: completion events: {e}", lc.conn.client_id);
                }
            }
            events = self.poll_conns(counters);
        }
        if !self.dead.is_empty() {
            let mut dead = std::mem::take(&mut self.dead);
            dead.sort_unstable();
            dead.dedup();
            for &i in dead.iter().rev() {
                self.retire(i, counters);
            }
            self.dead = dead;
        }
        Ok(events)
    }

    fn next_request(&mut self, _: &Counters) -> Result<Option<RdmaJob>, TransportError> {
        // The job handed out before this call has been answered or queued by now.
        self.repost_handed_out();
        let job = self.ready.pop_front();
        if job.is_some() {
            self.handed_out += 1;
        }
        Ok(job)
    }

    fn answer<R>(
        &mut self,
        job: RdmaJob,
        write: impl FnOnce(&[u8], &mut dyn ReplyBuffer) -> Option<R>,
    ) -> InLoop<R, RdmaJob> {
        let RdmaJob {
            conn,
            req,
            len,
            announced,
            resident,
            landing,
            received,
        } = job;
        match conn.reply_with(req, len as usize, |msg, w| write(msg, w)) {
            Ok((outcome, head, sent)) => InLoop::Sent {
                outcome,
                head,
                sent,
            },
            Err(req) => InLoop::Kept(RdmaJob {
                conn,
                req,
                len,
                announced,
                resident,
                landing,
                received,
            }),
        }
    }

    fn declared_total_clients(&self) -> Option<u32> {
        (self.total_clients > 0).then_some(self.total_clients)
    }

    fn finished(&self) -> bool {
        let done = !self.cfg.keep_alive && self.served_any && self.conns.is_empty();
        if done {
            log::info!("last client left and keep-alive is off: stopping");
        }
        done
    }

    fn shut_down(&mut self, _: &Counters) -> Result<usize, TransportError> {
        // The workers have posted every reply; let the sends complete before the
        // disconnect flushes whatever is still queued.
        let start = Instant::now();
        let mut quiet_since = Instant::now();
        let mut completed = 0;
        while start.elapsed() < SHUTDOWN_MAX && quiet_since.elapsed() < SHUTDOWN_QUIET {
            let mut n = 0;
            for lc in &self.conns {
                n += lc.conn.poll(&mut self.wcs).unwrap_or(0);
            }
            if n > 0 {
                completed += n;
                quiet_since = Instant::now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        log::debug!("{completed} completions drained at shutdown");
        for lc in self.conns.drain(..) {
            lc.conn.close();
        }
        self.ready.clear();
        self.repost.clear();
        // The manager frees what it still holds as it stops.
        if let Some(manager) = self.manager.as_mut() {
            manager.stop();
        }
        Ok(0)
    }
}

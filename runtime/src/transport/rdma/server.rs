//! The RDMA server transport, driven by the serving core: one receive loop owns every
//! connection's completion queue and the rdma_cm event channel. A request completion names
//! its slot and length in the immediate; [`RdmaServer`] checks both (a client breaking the
//! ring rules is disconnected), claims the slot and hands the core an [`RdmaJob`] whose bytes
//! stay in the ring slot. Replies are staged in the connection's staging slot of the same
//! index and written into the client's response slot of that index, from the loop (echoes,
//! rejections) or straight from a worker's [`RdmaReplySink`] (posting is thread-safe).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hacserve_ffi::gpu::cuda::cu;
use hacserve_ffi::rdma::{
    AccessFlags, CmEvent, CmEventKind, CmId, EventChannel, QpSizes, RcEndpoint, Rdma, SlotToken,
    WcOpcode, WcStatus, WorkCompletion,
};

use super::wire::*;
use super::{rdma_err, SlotWriter, WR_SEND};
use crate::clock::realtime_ns;
use crate::contract::{Counters, InLoop, ReplySink, ServerJob, ServerTransport, TransportError};
use crate::protocol::{header_bytes, ReplyBuffer, HEADER_LEN};

/// Idle receive loop in block mode: empty rounds before it sleeps, and the sleep (no
/// completion channel yet), longer while no client is connected.
const IDLE_SPINS: u32 = 64;
const IDLE_SLEEP: Duration = Duration::from_micros(50);
const IDLE_SLEEP_NO_CLIENT: Duration = Duration::from_millis(2);
/// Rounds between two looks at the rdma_cm channel while busy.
const CM_EVERY: u64 = 256;
/// At shutdown: poll for the last replies' completions until quiet this long, at most
/// SHUTDOWN_MAX, before disconnecting (a disconnect flushes sends still queued).
const SHUTDOWN_QUIET: Duration = Duration::from_millis(20);
const SHUTDOWN_MAX: Duration = Duration::from_millis(500);

const REQ_BUF: usize = 0;
const STAGE_BUF: usize = 1;

/// One client's connection on the server: its QP, its request ring (remote-writable, only
/// its own slots) and its reply staging ring (local only).
pub struct ServerConn {
    ep: RcEndpoint,
    client_id: u32,
    slot_size: usize,
    depth: u32,
    resp_slot_size: usize,
    resp_addr: u64,
    resp_rkey: u32,
    alive: AtomicBool,
    /// The ring is GPU buffer 0 of `ep`; host buffer REQ_BUF is its mirror.
    gpu_ring: bool,
}

impl ServerConn {
    /// With a ring in GPU memory: copies the first `len` bytes of the request slot `req`
    /// holds into its host mirror, where [`Self::request`] reads them.
    fn mirror_from_gpu(&self, req: &mut SlotToken, len: usize) -> Result<(), String> {
        if !self.gpu_ring {
            return Ok(());
        }
        let (slot, off) = (req.slot(), req.offset());
        let dst = req
            .bytes_mut()
            .get_mut(..len)
            .ok_or_else(|| format!("slot {slot} + {len} B outside the mirror"))?;
        self.ep.gpu_buf(0).copy_to_host(off, dst)
    }

    /// The first `len` request bytes of the slot `req` holds (the client holds no credit for
    /// it until its reply is written; one breaking the credit rule can only garble its own
    /// request, which the pipeline validates like any other bytes).
    fn request<'a>(&self, req: &'a SlotToken, len: usize) -> &'a [u8] {
        req.bytes().get(..len).unwrap_or(&[])
    }

    /// Stages a reply to the request `req` holds with `write`, which gets the request's
    /// first `len` bytes and the staging slot of the same index, and writes it into the
    /// client's response slot of that index; the request slot is free once the reply is
    /// staged. `write` returning None stages nothing and gives `req` back. Returns what
    /// `write` returned, the reply's header (for the accounting) and whether the post worked.
    #[allow(clippy::type_complexity)]
    fn reply_with<R>(
        &self,
        req: SlotToken,
        len: usize,
        write: impl FnOnce(&[u8], &mut dyn ReplyBuffer) -> Option<R>,
    ) -> Result<(R, [u8; HEADER_LEN], Result<(), TransportError>), SlotToken> {
        let slot = req.slot();
        // Only the holder of the request slot stages into the staging slot of that index,
        // and its previous reply was delivered before the client could send this request,
        // so the NIC no longer reads it.
        let mut stage = self.ep.ring(STAGE_BUF).claim(slot);
        let request = self.request(&req, len);
        let (written, reply_len, head) = match stage.as_mut().map(SlotToken::bytes_mut) {
            Some(buf) => {
                let mut w = SlotWriter { buf, len: 0 };
                let r = write(request, &mut w);
                (r, Some(w.len), header_bytes(w.bytes()))
            }
            None => {
                // Cannot happen (the request's token excludes every other stager): the reply
                // is written aside so the outcome is known, and reported undeliverable.
                let mut aside = Vec::new();
                let r = write(request, &mut aside);
                (r, None, [0; HEADER_LEN])
            }
        };
        let Some(r) = written else {
            return Err(req);
        };
        // The reply is staged: the request slot is free for the client's next request.
        drop(req);
        let sent = match reply_len {
            Some(n) => self.post_reply(slot, slot as usize * self.resp_slot_size, n),
            None => Err(rdma_err("staging slot out of range or busy")),
        };
        Ok((r, head, sent))
    }

    fn post_reply(&self, slot: u32, off: usize, len: usize) -> Result<(), TransportError> {
        if !self.alive.load(Ordering::Acquire) {
            return Err(rdma_err(format!("client {} disconnected", self.client_id)));
        }
        let imm = encode_imm(slot, len as u32)
            .ok_or_else(|| rdma_err(format!("reply of {len} bytes does not fit an immediate")))?;
        let remote = self.resp_addr + (slot as usize * self.resp_slot_size) as u64;
        self.ep
            .post_write_imm(
                WR_SEND | slot as u64,
                STAGE_BUF,
                off,
                len,
                remote,
                self.resp_rkey,
                imm,
            )
            .map_err(|e| {
                self.alive.store(false, Ordering::Release);
                e.into()
            })
    }
}

/// A request waiting in its ring slot.
pub struct RdmaJob {
    conn: Arc<ServerConn>,
    /// Holds the request slot until the reply is staged (or the job is dropped, even by a
    /// panicking worker).
    req: SlotToken,
    /// Bytes of the slot that hold the request (at most the slot).
    len: u32,
    /// The length the immediate announced when it exceeded the slot.
    announced: Option<u32>,
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
        Some(self.conn.slot_size - HEADER_LEN)
    }
    fn oversize(&self) -> Option<String> {
        self.announced.map(|len| {
            format!(
                "immediate length {len} exceeds the {}-byte slot",
                self.conn.slot_size
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
}

/// Limits and behaviour of the listening side.
#[derive(Debug, Clone)]
pub struct RdmaServerConfig {
    /// Largest request slot a client may ask for.
    pub max_slot_size: u32,
    /// Largest ring depth a client may ask for.
    pub max_depth: u32,
    /// Keep serving after the last client left (false: stop once every client that connected
    /// has disconnected).
    pub keep_alive: bool,
    /// Where request rings live: host memory, or (GPUDirect RDMA, `-a 1`) GPU memory.
    pub addressing: Addressing,
}

/// Where the server places each client's request ring.
#[derive(Debug, Clone, Default)]
pub enum Addressing {
    #[default]
    Host,
    /// On this GPU: clients' RDMA writes land in device memory (registered through dma-buf,
    /// else nvidia-peermem). The receive loop copies each request's bytes to a host mirror
    /// of the slot for validation and the CPU-side stages.
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

/// The listening side: the rdma_cm listener and every client connection.
pub struct RdmaServer {
    rdma: Rdma,
    channel: Arc<EventChannel>,
    _listener: CmId,
    addr: SocketAddr,
    cfg: RdmaServerConfig,
    conns: Vec<Arc<ServerConn>>,
    /// Whether any client has connected (for keep-alive off).
    served_any: bool,
    /// With [`Addressing::Gpu`]: the stream request rings are allocated and read on.
    gpu_stream: Option<Arc<cu::CudaStream>>,
    /// The payload limit announced to clients in the handshake.
    max_payload: usize,
    /// Request completions taken from the CQs, waiting for `next_request`.
    ready: VecDeque<RdmaJob>,
    /// The receives of the jobs in `ready` (same order), reposted one by one once the loop
    /// has answered or queued the job: off the reply's critical path, yet before the client's
    /// next request needs one (depth + 1 are posted, the spare takes a request in between; a
    /// client finding none would stall on RNR retries).
    repost: VecDeque<(Arc<ServerConn>, u64)>,
    /// Jobs handed to the loop whose receives are not reposted yet.
    handed_out: usize,
    wcs: [WorkCompletion; 32],
    rounds: u64,
    dead: Vec<usize>,
}

impl RdmaServer {
    /// Loads the RDMA libraries, checks for a device and listens on `addr` (port 0 = any).
    /// Clients are told `max_payload` (or their slot, if smaller) as their payload limit.
    pub fn listen(
        addr: SocketAddr,
        cfg: RdmaServerConfig,
        max_payload: usize,
    ) -> Result<Self, TransportError> {
        let rdma = Rdma::load()?;
        let gpu_stream = match &cfg.addressing {
            Addressing::Host => None,
            Addressing::Gpu(ring) => Some(ring.stream.clone()),
        };
        let channel = EventChannel::new(rdma)?;
        let listener = CmId::new(rdma, &channel)?;
        let port = listener.listen(&addr, 64)?;
        let mut addr = addr;
        addr.set_port(port);
        Ok(RdmaServer {
            rdma,
            channel,
            _listener: listener,
            addr,
            cfg,
            conns: Vec::new(),
            served_any: false,
            gpu_stream,
            max_payload,
            ready: VecDeque::with_capacity(256),
            repost: VecDeque::with_capacity(256),
            handed_out: 0,
            wcs: [WorkCompletion::default(); 32],
            rounds: 0,
            dead: Vec::with_capacity(16),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of connected clients.
    pub fn clients(&self) -> usize {
        self.conns.len()
    }

    fn accept(&mut self, ev: CmEvent, max_payload: usize) {
        let Some(id) = ev.new_id else {
            return;
        };
        let req = match ConnectRequest::decode(&ev.private_data) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("connection refused: {e}");
                let _ = id.reject(&encode_reject(&e.to_string()));
                return;
            }
        };
        if req.depth > self.cfg.max_depth || req.slot_size > self.cfg.max_slot_size {
            let e = HandshakeError::TooLarge {
                depth: req.depth,
                slot_size: req.slot_size,
                max_depth: self.cfg.max_depth,
                max_slot: self.cfg.max_slot_size,
            };
            log::warn!("client {} refused: {e}", req.client_id);
            let _ = id.reject(&encode_reject(&e.to_string()));
            return;
        }
        match self.setup_conn(id, &req, max_payload) {
            Ok(conn) => {
                log::info!(
                    "client {} connected: {} slots x {} B, replies up to {} B sent inline",
                    req.client_id,
                    req.depth,
                    req.slot_size,
                    conn.ep.max_inline()
                );
                self.conns.push(conn);
                self.served_any = true;
            }
            Err(e) => log::error!("client {}: accepting failed: {e}", req.client_id),
        }
    }

    fn setup_conn(
        &self,
        id: CmId,
        req: &ConnectRequest,
        max_payload: usize,
    ) -> Result<Arc<ServerConn>, TransportError> {
        let depth = req.depth;
        // depth + 1 receives: a request consumes one until the loop has answered (or queued)
        // it and reposted; its reply returns the client's credit, so one more request may
        // arrive in between and needs the spare.
        let sizes = QpSizes {
            cq_entries: 3 * depth + 16,
            max_send_wr: 2 * depth + 4,
            max_recv_wr: depth + 1,
        };
        let mut ep = RcEndpoint::create(self.rdma, id, sizes)?;
        let slot_size = req.slot_size as usize;
        let resp_slot_size = response_slot_size(req.slot_size) as usize;
        let ring_len = depth as usize * slot_size;
        // The client's ring: remote write only (no remote read), its own slots only. In GPU
        // memory, the host buffer at REQ_BUF is only the local mirror.
        let ring_access = AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE;
        let (req_addr, req_rkey) = match &self.gpu_stream {
            Some(stream) => {
                let gpu = match ep.register_gpu(stream, ring_len, ring_access) {
                    Ok(gpu) => gpu,
                    Err(e) => {
                        // The client learns why (the reject carries the text).
                        let _ = ep.reject(&encode_reject(&e.to_string()));
                        return Err(e.into());
                    }
                };
                let ring = ep.gpu_buf(gpu);
                log::info!(
                    "client {}: request ring of {ring_len} B in GPU memory, registered via {:?}",
                    req.client_id,
                    ring.route()
                );
                let addr_key = (ring.addr(), ring.rkey());
                ep.register_ring(slot_size, depth, AccessFlags::LOCAL_WRITE)?;
                addr_key
            }
            None => {
                ep.register_ring(slot_size, depth, ring_access)?;
                (ep.buf(REQ_BUF).addr(), ep.buf(REQ_BUF).rkey())
            }
        };
        let stage = ep.register_ring(resp_slot_size, depth, AccessFlags::LOCAL_WRITE)?;
        debug_assert_eq!(stage, STAGE_BUF);
        for i in 0..=depth {
            ep.post_recv_empty(i as u64)?;
        }
        let reply = AcceptReply {
            slot_size: req.slot_size,
            depth,
            req_addr,
            req_rkey,
            max_payload: max_payload.min(slot_size - HEADER_LEN) as u32,
        };
        ep.accept(&reply.encode())?;
        Ok(Arc::new(ServerConn {
            ep,
            client_id: req.client_id,
            slot_size,
            depth,
            resp_slot_size,
            resp_addr: req.resp_addr,
            resp_rkey: req.resp_rkey,
            alive: AtomicBool::new(true),
            gpu_ring: self.gpu_stream.is_some(),
        }))
    }

    /// Handles pending CM events; `timeout_ms` as for [`EventChannel::next`].
    fn cm_events(&mut self, timeout_ms: i32, max_payload: usize) -> Result<(), TransportError> {
        let mut timeout = timeout_ms;
        while let Some(ev) = self.channel.next(timeout)? {
            timeout = 0;
            match ev.kind {
                CmEventKind::ConnectRequest => self.accept(ev, max_payload),
                CmEventKind::Established => log::debug!("connection established"),
                CmEventKind::Disconnected | CmEventKind::DeviceRemoval => {
                    if let Some(i) = self.conns.iter().position(|c| c.ep.handle() == ev.id) {
                        let c = self.conns.swap_remove(i);
                        c.alive.store(false, Ordering::Release);
                        let _ = c.ep.disconnect();
                        log::info!("client {} disconnected", c.client_id);
                    }
                }
                CmEventKind::TimewaitExit => {}
                _ => log::debug!("CM event {} (status {})", ev.name, ev.status),
            }
        }
        Ok(())
    }

    /// Reposts the receives of the jobs handed out so far.
    fn repost_handed_out(&mut self) {
        for _ in 0..std::mem::take(&mut self.handed_out) {
            let Some((conn, wr_id)) = self.repost.pop_front() else {
                break;
            };
            if !conn.alive.load(Ordering::Acquire) {
                continue;
            }
            if let Err(e) = conn.ep.post_recv_empty(wr_id) {
                log::error!("client {}: reposting a receive: {e}", conn.client_id);
                conn.alive.store(false, Ordering::Release);
            }
        }
    }

    /// Closes connection `i` on the server's decision (the reason was logged already).
    fn drop_conn(&mut self, i: usize) {
        let c = self.conns.swap_remove(i);
        c.alive.store(false, Ordering::Release);
        let _ = c.ep.disconnect();
        log::warn!("client {} disconnected by the server", c.client_id);
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
        let Some(mut req) = conn.ep.ring(REQ_BUF).claim(slot) else {
            return Err(format!(
                "request into slot {slot} while it is still being served (no credit)"
            ));
        };
        let announced = len as usize;
        let held = announced.min(conn.slot_size);
        if let Err(e) = conn.mirror_from_gpu(&mut req, held) {
            return Err(format!("reading slot {slot} from GPU memory failed ({e})"));
        }
        // Beyond the slot the length cannot be right: only the header is read.
        let oversize = announced > conn.slot_size;
        Ok(RdmaJob {
            conn: conn.clone(),
            req,
            len: if oversize { HEADER_LEN as u32 } else { len },
            announced: oversize.then_some(len),
            received: realtime_ns(),
        })
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
        } else {
            IDLE_SLEEP
        };
        (IDLE_SPINS, sleep)
    }

    fn poll(&mut self, wait: Duration, counters: &Counters) -> Result<usize, TransportError> {
        self.repost_handed_out();
        self.rounds += 1;
        if self.rounds % CM_EVERY == 0 || self.conns.is_empty() || !wait.is_zero() {
            self.cm_events(0, self.max_payload)?;
        }
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        let mut events = 0;
        self.dead.clear();
        for (ci, conn) in self.conns.iter().enumerate() {
            if !conn.alive.load(Ordering::Acquire) {
                self.dead.push(ci);
                continue;
            }
            let n = match conn.ep.poll(&mut self.wcs) {
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
                            conn.ep.wc_status_str(wc.status())
                        );
                    }
                    counters.transport_errors.fetch_add(1, Ordering::Relaxed);
                    self.dead.push(ci);
                    break;
                }
                if wc.opcode() != WcOpcode::RecvRdmaWithImm {
                    continue; // a reply's send completion
                }
                match Self::take_request(conn, wc) {
                    Ok(job) => {
                        self.ready.push_back(job);
                        self.repost.push_back((conn.clone(), wc.wr_id()));
                    }
                    Err(why) => {
                        log::warn!("client {}: {why}; disconnecting it", conn.client_id);
                        self.dead.push(ci);
                        break;
                    }
                }
            }
        }
        if !self.dead.is_empty() {
            let mut dead = std::mem::take(&mut self.dead);
            dead.sort_unstable();
            dead.dedup();
            for &i in dead.iter().rev() {
                self.drop_conn(i);
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
                received,
            }),
        }
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
            for conn in &self.conns {
                n += conn.ep.poll(&mut self.wcs).unwrap_or(0);
            }
            if n > 0 {
                completed += n;
                quiet_since = Instant::now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        log::debug!("{completed} completions drained at shutdown");
        for c in self.conns.drain(..) {
            c.alive.store(false, Ordering::Release);
            let _ = c.ep.disconnect();
        }
        Ok(0)
    }
}

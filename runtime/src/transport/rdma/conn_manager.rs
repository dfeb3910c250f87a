//! rdma_server's connection manager: one thread that owns the rdma_cm event channel and does
//! everything a connection costs outside the serving path, so that a slow or hostile connect
//! never delays another client's requests. Per connect request it checks the handshake and
//! the entry limits ([`Admission`]; a refusal goes back in the reject's private data), creates
//! the QP and CQ, registers the rings, posts the receives and accepts; once the connection is
//! ESTABLISHED it hands it to the receive loop through a bounded lock-free queue that the
//! loop looks at every few rounds (no syscall). It also handles the CM's disconnects and
//! failures (marking the connection dead, which the loop notices), and frees each connection
//! once the loop and every worker job have let go of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hacserve_ffi::gpu::cuda::cu;
use hacserve_ffi::rdma::{
    AccessFlags, CmEvent, CmEventKind, CmId, EventChannel, HostBuf, PdShare, QpSizes, RcEndpoint,
    Rdma, SlotRing,
};

use super::admission::{registered_bytes, size_text, Admission, Reservation};
use super::conn::{Link, ServerConn, LANDING_BUF, STAGE_BUF};
use super::gpu_ring::verbs::{VerbsGpuRing, REPLY_GPU_BUF, REQUEST_GPU_BUF};
use super::gpu_ring::{GpuRingSource, DEVICE_REPLY_SLOT};
use super::wire::*;
use crate::contract::{Refusal, TransportError};
use crate::protocol::HEADER_LEN;

/// How long the manager waits on the event channel before it looks at its stop flag and at
/// the connections waiting to be freed.
const WAIT_MS: i32 = 20;

/// What the manager needs to set connections up.
pub(super) struct SetupRules {
    pub max_slot_size: u32,
    pub max_depth: u32,
    /// With GPU addressing: the stream request rings are allocated and read on.
    pub gpu_stream: Option<Arc<cu::CudaStream>>,
    /// The payload limit announced to clients (or their slot, if smaller).
    pub max_payload: usize,
    /// Grant the memory-polled fast path to clients that ask (host addressing, polled
    /// receive loop: docs/rdma.md).
    pub fast_path: bool,
    /// Give every connection's CQ a completion channel (`--poll-mode event`).
    pub events: bool,
    /// Zero-copy proxy: every connection in this shared protection domain, its requests
    /// left in the landing ring.
    pub pd_share: Option<Arc<PdShare>>,
    /// Host addressing: register each copy ring with this CUDA context.
    pub host_cuda: Option<Arc<cu::CudaContext>>,
}

/// The running manager thread, as the receive loop sees it.
pub(super) struct ConnManager {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Established connections for the receive loop.
    pub incoming: Arc<ArrayQueue<Arc<ServerConn>>>,
}

impl ConnManager {
    /// Starts the thread that serves `listener`'s connect requests.
    pub fn start(
        rdma: Rdma,
        channel: Arc<EventChannel>,
        listener: CmId,
        rules: SetupRules,
        admission: Arc<Admission>,
        max_connections: u32,
    ) -> Result<ConnManager, TransportError> {
        let stop = Arc::new(AtomicBool::new(false));
        let incoming = Arc::new(ArrayQueue::new(max_connections.max(1) as usize));
        let mut manager = Manager {
            rdma,
            channel,
            listener,
            rules,
            admission,
            incoming: incoming.clone(),
            pending: Vec::new(),
            live: Vec::new(),
        };
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rdma-conn-manager".into())
            .spawn(move || manager.run(&flag))
            .map_err(|e| super::rdma_err(format!("starting the connection manager: {e}")))?;
        Ok(ConnManager {
            stop,
            thread: Some(thread),
            incoming,
        })
    }

    /// Stops the thread (within [`WAIT_MS`]); it drops its handles on every connection.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the RDMA connection manager panicked");
            }
        }
    }
}

impl Drop for ConnManager {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Manager {
    rdma: Rdma,
    channel: Arc<EventChannel>,
    listener: CmId,
    rules: SetupRules,
    admission: Arc<Admission>,
    incoming: Arc<ArrayQueue<Arc<ServerConn>>>,
    /// Accepted, waiting for ESTABLISHED (with how long the set-up took).
    pending: Vec<(Arc<ServerConn>, Duration)>,
    /// Handed to the loop; freed once dead and held by nobody else.
    live: Vec<Arc<ServerConn>>,
}

impl Manager {
    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Acquire) {
            match self.channel.next(WAIT_MS) {
                Ok(Some(ev)) => self.on_event(ev),
                Ok(None) => {}
                Err(e) => {
                    log::error!("rdma_cm event channel: {e}");
                    std::thread::sleep(Duration::from_millis(WAIT_MS as u64));
                }
            }
            self.free_finished();
        }
    }

    fn on_event(&mut self, ev: CmEvent) {
        match ev.kind {
            CmEventKind::ConnectRequest => self.on_connect_request(ev),
            CmEventKind::Established => {
                let Some(i) = self.pending.iter().position(|(c, _)| c.handle() == ev.id) else {
                    log::debug!("ESTABLISHED for an unknown connection");
                    return;
                };
                let (conn, setup) = self.pending.swap_remove(i);
                log::info!(
                    "client {} connected: {} slots x {} B, replies up to {} B sent inline, {}, {} pinned, set up in {:.1} ms (now {})",
                    conn.client_id(),
                    conn.depth(),
                    conn.slot_size(),
                    conn.max_inline(),
                    if conn.fast {
                        "fast path (memory-polled, up to 8192 B)"
                    } else {
                        "WRITE_WITH_IMM only"
                    },
                    size_text(conn.pinned_bytes()),
                    setup.as_secs_f64() * 1e3,
                    self.admission.usage()
                );
                if self.incoming.push(conn.clone()).is_err() {
                    // Cannot happen: the queue holds max-connections and admission bounds them.
                    log::error!(
                        "client {}: hand-off queue full; dropping it",
                        conn.client_id()
                    );
                    conn.close();
                }
                self.live.push(conn);
            }
            CmEventKind::Disconnected | CmEventKind::DeviceRemoval => {
                if ev.id == self.listener.handle() {
                    log::error!("RDMA device removed under the listener: no new connections");
                    return;
                }
                if let Some(i) = self.pending.iter().position(|(c, _)| c.handle() == ev.id) {
                    let (conn, _) = self.pending.swap_remove(i);
                    log::info!(
                        "client {} went away ({}) before its connection was established",
                        conn.client_id(),
                        ev.name
                    );
                } else if let Some(c) = self.live.iter().find(|c| c.handle() == ev.id) {
                    if c.close() {
                        log::info!("client {} disconnected ({})", c.client_id(), ev.name);
                    }
                }
            }
            CmEventKind::ConnectError | CmEventKind::Unreachable | CmEventKind::Rejected => {
                if let Some(i) = self.pending.iter().position(|(c, _)| c.handle() == ev.id) {
                    let (conn, _) = self.pending.swap_remove(i);
                    log::warn!(
                        "client {}: connection failed before it was established ({}, status {})",
                        conn.client_id(),
                        ev.name,
                        ev.status
                    );
                }
            }
            CmEventKind::TimewaitExit => {}
            _ => log::debug!("CM event {} (status {})", ev.name, ev.status),
        }
    }

    fn on_connect_request(&mut self, ev: CmEvent) {
        let Some(id) = ev.new_id else {
            return;
        };
        let req = match ConnectRequest::decode(&ev.private_data) {
            Ok(r) => r,
            Err(e) => return refuse(&id, None, &Refusal::BadHandshake(e.to_string())),
        };
        let who = Some(req.client_id);
        if req.depth > self.rules.max_depth || req.slot_size > self.rules.max_slot_size {
            let refusal = Refusal::RingTooLarge {
                depth: req.depth,
                slot_size: req.slot_size,
                max_depth: self.rules.max_depth,
                max_slot: self.rules.max_slot_size,
            };
            return refuse(&id, who, &refusal);
        }
        let fast = self.grants_fast_path(&req);
        let bytes = registered_bytes(req.depth, req.slot_size);
        let reservation = match self.admission.admit(req.client_id, bytes) {
            Ok(r) => r,
            Err(refusal) => return refuse(&id, who, &refusal),
        };
        let started = Instant::now();
        match self.set_up(id, &req, reservation, fast) {
            Ok(conn) => self.pending.push((conn, started.elapsed())),
            Err(e) => log::error!(
                "client {}: setting the connection up failed: {e}",
                req.client_id
            ),
        }
    }

    /// Whether `req` gets the fast path: asked for, allowed here (`--fast-path on`, a polled
    /// receive loop, host memory) and its rings fit it.
    fn grants_fast_path(&self, req: &ConnectRequest) -> bool {
        req.flags & FLAG_FAST_PATH != 0
            && self.rules.fast_path
            && !self.rules.events
            && self.rules.gpu_stream.is_none()
            && fast_path_fits(req.slot_size, req.resp_slot_size)
    }

    /// QP, CQ, rings, receives, accept: everything but the hand-off.
    fn set_up(
        &self,
        id: CmId,
        req: &ConnectRequest,
        reservation: Reservation,
        fast: bool,
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
        // A failure here destroys the id, which rejects the request without a reason.
        let share = self.rules.pd_share.as_deref();
        let mut ep = RcEndpoint::create_in(self.rdma, id, sizes, self.rules.events, share)?;
        match self.register(&mut ep, req) {
            Ok((req_addr, req_rkey)) => {
                let slot_size = req.slot_size as usize;
                let usable = slot_size - if fast { FAST_WORD_LEN } else { 0 };
                let reply = AcceptReply {
                    flags: if fast { FLAG_FAST_PATH } else { 0 },
                    slot_size: req.slot_size,
                    depth,
                    req_addr,
                    req_rkey,
                    max_payload: self.rules.max_payload.min(usable - HEADER_LEN) as u32,
                };
                ep.accept(&reply.encode())?;
                let conn = if self.rules.gpu_stream.is_some() {
                    let stage = response_slot_size(req.slot_size) as usize;
                    let ring = VerbsGpuRing::new(ep, slot_size, depth, stage);
                    gpu_conn(Box::new(ring), req, reservation)?
                } else {
                    let zero_copy = share.is_some();
                    let copy = registered_copy_ring(req, self.rules.host_cuda.as_ref())?;
                    ServerConn::new(Link::Host(ep), copy, req, reservation, fast, zero_copy)
                };
                Ok(Arc::new(conn))
            }
            Err(e) => {
                let refusal = Refusal::SetupFailed(e.to_string());
                log::warn!("client {}: connection refused: {refusal}", req.client_id);
                let _ = ep.reject(&encode_reject(&refusal));
                Err(e)
            }
        }
    }

    /// Registers the staging ring and the landing ring (host or GPU memory; with GPU memory
    /// also the device reply ring), and posts the receives; returns the landing ring's
    /// address and key for the client.
    fn register(
        &self,
        ep: &mut RcEndpoint,
        req: &ConnectRequest,
    ) -> Result<(u64, u32), TransportError> {
        let depth = req.depth;
        let slot_size = req.slot_size as usize;
        let ring_len = depth as usize * slot_size;
        let stage = ep.register_ring(
            response_slot_size(req.slot_size) as usize,
            depth,
            AccessFlags::LOCAL_WRITE,
        )?;
        debug_assert_eq!(stage, STAGE_BUF);
        // The client's landing ring: remote write only (no remote read), its own slots only.
        let ring_access = AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE;
        let (addr, rkey) = match &self.rules.gpu_stream {
            Some(stream) => {
                let gpu = ep.register_gpu(stream, ring_len, ring_access)?;
                debug_assert_eq!(gpu, REQUEST_GPU_BUF);
                // The NIC only reads it (the gathered reply's device part).
                let reply_len = depth as usize * DEVICE_REPLY_SLOT;
                let replies = ep.register_gpu(stream, reply_len, AccessFlags::LOCAL_WRITE)?;
                debug_assert_eq!(replies, REPLY_GPU_BUF);
                let ring = ep.gpu_buf(gpu);
                log::info!(
                    "client {}: request ring of {ring_len} B and reply ring of {reply_len} B in GPU memory, registered via {:?}",
                    req.client_id,
                    ring.route()
                );
                (ring.addr(), ring.rkey())
            }
            None => {
                let landing = ep.register_ring(slot_size, depth, ring_access)?;
                debug_assert_eq!(landing, LANDING_BUF);
                (ep.buf(landing).addr(), ep.buf(landing).rkey())
            }
        };
        for i in 0..=depth {
            ep.post_recv_empty(i as u64)?;
        }
        Ok((addr, rkey))
    }

    /// Drops the connections that are dead and no longer held by the loop or a job: their
    /// QP, CQ and memory are freed and their reservation given back (it logs).
    fn free_finished(&mut self) {
        self.live
            .retain(|c| c.is_alive() || Arc::strong_count(c) > 1);
    }
}

/// The connection's private copy ring: each request (with a GPU ring, its header) is copied
/// here before it is read (server-owned, never registered with the NIC, so no peer can write
/// it; with host addressing and a GPU backend it is registered with CUDA instead).
fn copy_ring(req: &ConnectRequest) -> Result<SlotRing<HostBuf>, TransportError> {
    host_ring(req.slot_size as usize, req.depth, "request copy")
}

/// The copy ring of a host-addressed connection, registered with CUDA when the server
/// has a GPU backend (`cuda`): the engine's uploads then read the requests in place. A
/// registration the driver refuses is logged and counted; the connection keeps plain
/// memory and the uploads are staged by the driver.
fn registered_copy_ring(
    req: &ConnectRequest,
    cuda: Option<&Arc<cu::CudaContext>>,
) -> Result<SlotRing<HostBuf>, TransportError> {
    let len = req.slot_size as usize * req.depth as usize;
    let mut mem = HostBuf::new(len)
        .ok_or_else(|| super::rdma_err(format!("allocating the {len}-byte request copy ring")))?;
    if let Some(ctx) = cuda {
        match mem.register_with_cuda(ctx) {
            Ok(()) => {
                let n = hacserve_ffi::gpu::host_register::counts();
                log::info!(
                    "client {}: request copy ring of {len} B registered with CUDA (uploads \
                     read it in place; {} live registration(s), {} B registered so far)",
                    req.client_id,
                    n.live,
                    n.bytes
                );
            }
            Err(e) => log::warn!(
                "client {}: request copy ring not registered with CUDA ({e}): uploads from it \
                 are staged by the driver",
                req.client_id
            ),
        }
    }
    Ok(SlotRing::new(mem, req.slot_size as usize, req.depth)
        .map_err(hacserve_ffi::rdma::RdmaError::from)?)
}

fn host_ring(slot: usize, depth: u32, what: &str) -> Result<SlotRing<HostBuf>, TransportError> {
    let len = slot * depth as usize;
    let mem = HostBuf::new(len)
        .ok_or_else(|| super::rdma_err(format!("allocating the {len}-byte {what} ring")))?;
    Ok(SlotRing::new(mem, slot, depth).map_err(hacserve_ffi::rdma::RdmaError::from)?)
}

/// A GPU-ring connection over `source` (verbs or loopback), with its copy ring and the
/// private host slots its replies' host parts are written into; receives are the source's.
pub(super) fn gpu_conn(
    source: Box<dyn GpuRingSource>,
    req: &ConnectRequest,
    reservation: Reservation,
) -> Result<ServerConn, TransportError> {
    let stage = host_ring(
        response_slot_size(req.slot_size) as usize,
        req.depth,
        "reply staging",
    )?;
    log::info!(
        "client {}: GPU-resident ring ({}): only headers are read on the host, replies' top-5 are sent from GPU memory",
        req.client_id,
        source.route()
    );
    Ok(ServerConn::new(
        Link::Gpu { source, stage },
        copy_ring(req)?,
        req,
        reservation,
        false,
        false,
    ))
}

/// Rejects a connect request with `refusal` in the private data, and logs it.
fn refuse(id: &CmId, client: Option<u32>, refusal: &Refusal) {
    match client {
        Some(c) => log::warn!("client {c}: connection refused: {refusal}"),
        None => log::warn!("connection refused: {refusal}"),
    }
    if let Err(e) = id.reject(&encode_reject(refusal)) {
        log::warn!("rdma_reject failed: {e}");
    }
}

//! RDMA transport (RC queue pairs set up with rdma_cm): per-client rings of registered
//! memory, requests and replies moved with RDMA WRITE_WITH_IMM, flow control by credits.
//! The wire formats (immediate, handshake private data) are in [`wire`]; the full
//! description with a diagram is docs/rdma.md.
//!
//! Server: one receive loop owns every connection's completion queue and the rdma_cm event
//! channel. A request completion names its slot and length in the immediate; the loop
//! validates both, answers echoes and rejections itself (straight into the reply staging
//! slot) and queues the rest for the workers as [`RdmaJob`]s whose bytes stay in the ring
//! slot. A worker's [`RdmaReplySink`] copies the reply into the connection's staging slot of
//! the same index and writes it into the client's response slot of that index.
//!
//! Client: [`RdmaClient`] implements [`ClientTransport`] with a registered send ring and a
//! response ring; `send` writes into the server's request slot, `recv` polls for the reply's
//! completion and lends the response slot.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hacserve_ffi::gpu::cuda::{self, cu};
use hacserve_ffi::rdma::{
    AccessFlags, CmEvent, CmEventKind, CmId, EventChannel, QpSizes, RcEndpoint, Rdma, RdmaError,
    SlotToken, WcOpcode, WcStatus, WorkCompletion,
};
use hacserve_ffi::signal;

use super::{ClientTransport, ReplySink, ServerJob, TransportError};
use crate::clock::realtime_ns;
use crate::pipeline::{answer_without_engine, Outcome, Triage};
use crate::protocol::{
    encode_error, ErrorCode, Header, ReplyBuffer, Task, FLAG_PRIORITY, HEADER_LEN,
};
use crate::server::{
    account, overloaded_reply, PollMode, ServerOptions, ServerRecord, WorkQueue, WorkerProbe,
};

pub use wire::*;

/// The byte layouts shared by both ends: immediates and connection private data.
pub mod wire {
    use crate::protocol::RESPONSE_BODY_LEN;

    /// rdma_server's default port (the original system's).
    pub const DEFAULT_PORT: u16 = 20079;
    /// Version of the RDMA handshake (private data) and ring protocol.
    pub const RDMA_PROTOCOL_VERSION: u16 = 1;
    /// Immediate: slot index in the top 8 bits, message length in the low 24.
    pub const IMM_LEN_BITS: u32 = 24;
    pub const IMM_LEN_MASK: u32 = (1 << IMM_LEN_BITS) - 1;
    /// Largest ring depth (requests in flight per client): what 8 slot bits can name.
    pub const MAX_DEPTH: u32 = 1 << (32 - IMM_LEN_BITS);
    /// Largest request slot: 8 MiB, so that a response slot (slot + 96 bytes of response
    /// body) still fits the 24 length bits.
    pub const MAX_SLOT_SIZE: u32 = 8 << 20;
    /// Smallest slot: room for the header and any error message.
    pub const MIN_SLOT_SIZE: u32 = 256;
    /// Private data magics: connect request, accept, reject.
    pub const CONNECT_MAGIC: [u8; 4] = *b"HCRQ";
    pub const ACCEPT_MAGIC: [u8; 4] = *b"HCRA";
    pub const REJECT_MAGIC: [u8; 4] = *b"HCRJ";
    /// Bytes of the connect request (IB CM carries at most 56 with rdma_cm's header).
    pub const CONNECT_LEN: usize = 36;
    /// Bytes of the accept reply (at most 196).
    pub const ACCEPT_LEN: usize = 32;
    /// Longest reject reason text (reject private data is at most 148 bytes).
    pub const MAX_REJECT_TEXT: usize = 136;

    /// The response slot size a client must offer for request slots of `slot_size`: room
    /// for the largest reply, an echo of a full slot.
    pub fn response_slot_size(slot_size: u32) -> u32 {
        slot_size + RESPONSE_BODY_LEN as u32
    }

    /// Packs (slot, length) into an immediate; `None` if either does not fit its bits.
    pub fn encode_imm(slot: u32, len: u32) -> Option<u32> {
        (slot < MAX_DEPTH && len <= IMM_LEN_MASK).then_some((slot << IMM_LEN_BITS) | len)
    }

    /// Splits an immediate into (slot, length); the caller validates both against the ring.
    pub fn decode_imm(imm: u32) -> (u32, u32) {
        (imm >> IMM_LEN_BITS, imm & IMM_LEN_MASK)
    }

    /// Why a handshake was refused or could not be read.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum HandshakeError {
        #[error("private data of {got} bytes, at least {want} expected")]
        Short { got: usize, want: usize },
        #[error("bad magic {0:02x?}: not a hacserve RDMA peer")]
        BadMagic([u8; 4]),
        #[error("RDMA protocol version {0}, this build speaks {RDMA_PROTOCOL_VERSION}")]
        BadVersion(u16),
        #[error("ring depth {0} outside 1..={MAX_DEPTH}")]
        BadDepth(u32),
        #[error("slot size {0} outside {MIN_SLOT_SIZE}..={MAX_SLOT_SIZE}")]
        BadSlotSize(u32),
        #[error("response slot of {got} bytes, at least {want} needed")]
        BadResponseSlot { got: u32, want: u32 },
        #[error("ring of {depth} x {slot_size} B exceeds the server's limits ({max_depth} x {max_slot} B)")]
        TooLarge {
            depth: u32,
            slot_size: u32,
            max_depth: u32,
            max_slot: u32,
        },
    }

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    }

    fn check_head(b: &[u8], magic: [u8; 4], want: usize) -> Result<(), HandshakeError> {
        if b.len() < want {
            return Err(HandshakeError::Short { got: b.len(), want });
        }
        let m = [b[0], b[1], b[2], b[3]];
        if m != magic {
            return Err(HandshakeError::BadMagic(m));
        }
        let v = u16_at(b, 4);
        if v != RDMA_PROTOCOL_VERSION {
            return Err(HandshakeError::BadVersion(v));
        }
        Ok(())
    }

    fn check_ring(depth: u32, slot_size: u32, resp_slot: u32) -> Result<(), HandshakeError> {
        if depth == 0 || depth > MAX_DEPTH {
            return Err(HandshakeError::BadDepth(depth));
        }
        if !(MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&slot_size) {
            return Err(HandshakeError::BadSlotSize(slot_size));
        }
        let want = response_slot_size(slot_size);
        if resp_slot < want || resp_slot > super::wire::IMM_LEN_MASK {
            return Err(HandshakeError::BadResponseSlot {
                got: resp_slot,
                want,
            });
        }
        Ok(())
    }

    /// Client -> server, in `rdma_connect`'s private data (36 bytes, little-endian):
    ///
    /// | off | size | field |
    /// |----:|----:|---|
    /// | 0 | 4 | magic `HCRQ` |
    /// | 4 | 2 | version (1) |
    /// | 6 | 2 | flags (0) |
    /// | 8 | 4 | client_id |
    /// | 12 | 4 | slot_size (request slot bytes) |
    /// | 16 | 4 | depth (slots = requests in flight) |
    /// | 20 | 4 | resp_slot_size |
    /// | 24 | 8 | resp_addr (client's response ring) |
    /// | 32 | 4 | resp_rkey |
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ConnectRequest {
        pub client_id: u32,
        pub slot_size: u32,
        pub depth: u32,
        pub resp_slot_size: u32,
        pub resp_addr: u64,
        pub resp_rkey: u32,
    }

    impl ConnectRequest {
        pub fn encode(&self) -> [u8; CONNECT_LEN] {
            let mut b = [0u8; CONNECT_LEN];
            b[0..4].copy_from_slice(&CONNECT_MAGIC);
            b[4..6].copy_from_slice(&RDMA_PROTOCOL_VERSION.to_le_bytes());
            b[8..12].copy_from_slice(&self.client_id.to_le_bytes());
            b[12..16].copy_from_slice(&self.slot_size.to_le_bytes());
            b[16..20].copy_from_slice(&self.depth.to_le_bytes());
            b[20..24].copy_from_slice(&self.resp_slot_size.to_le_bytes());
            b[24..32].copy_from_slice(&self.resp_addr.to_le_bytes());
            b[32..36].copy_from_slice(&self.resp_rkey.to_le_bytes());
            b
        }

        /// Parses and validates; trailing bytes are ignored (IB CM pads private data).
        pub fn decode(b: &[u8]) -> Result<Self, HandshakeError> {
            check_head(b, CONNECT_MAGIC, CONNECT_LEN)?;
            let r = ConnectRequest {
                client_id: u32_at(b, 8),
                slot_size: u32_at(b, 12),
                depth: u32_at(b, 16),
                resp_slot_size: u32_at(b, 20),
                resp_addr: u64_at(b, 24),
                resp_rkey: u32_at(b, 32),
            };
            check_ring(r.depth, r.slot_size, r.resp_slot_size)?;
            Ok(r)
        }
    }

    /// Server -> client, in `rdma_accept`'s private data (32 bytes, little-endian):
    ///
    /// | off | size | field |
    /// |----:|----:|---|
    /// | 0 | 4 | magic `HCRA` |
    /// | 4 | 2 | version (1) |
    /// | 6 | 2 | flags (0) |
    /// | 8 | 4 | slot_size (granted; = requested) |
    /// | 12 | 4 | depth (granted; = requested) |
    /// | 16 | 8 | req_addr (this client's request ring) |
    /// | 24 | 4 | req_rkey |
    /// | 28 | 4 | max_payload (server's payload limit for this ring) |
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct AcceptReply {
        pub slot_size: u32,
        pub depth: u32,
        pub req_addr: u64,
        pub req_rkey: u32,
        pub max_payload: u32,
    }

    impl AcceptReply {
        pub fn encode(&self) -> [u8; ACCEPT_LEN] {
            let mut b = [0u8; ACCEPT_LEN];
            b[0..4].copy_from_slice(&ACCEPT_MAGIC);
            b[4..6].copy_from_slice(&RDMA_PROTOCOL_VERSION.to_le_bytes());
            b[8..12].copy_from_slice(&self.slot_size.to_le_bytes());
            b[12..16].copy_from_slice(&self.depth.to_le_bytes());
            b[16..24].copy_from_slice(&self.req_addr.to_le_bytes());
            b[24..28].copy_from_slice(&self.req_rkey.to_le_bytes());
            b[28..32].copy_from_slice(&self.max_payload.to_le_bytes());
            b
        }

        pub fn decode(b: &[u8]) -> Result<Self, HandshakeError> {
            check_head(b, ACCEPT_MAGIC, ACCEPT_LEN)?;
            let r = AcceptReply {
                slot_size: u32_at(b, 8),
                depth: u32_at(b, 12),
                req_addr: u64_at(b, 16),
                req_rkey: u32_at(b, 24),
                max_payload: u32_at(b, 28),
            };
            check_ring(r.depth, r.slot_size, response_slot_size(r.slot_size))?;
            Ok(r)
        }
    }

    /// Server -> client, in `rdma_reject`'s private data: magic `HCRJ`, version, a u16
    /// length, then that many bytes of UTF-8 reason.
    pub fn encode_reject(reason: &str) -> Vec<u8> {
        let mut cut = reason.len().min(MAX_REJECT_TEXT);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut b = Vec::with_capacity(8 + cut);
        b.extend_from_slice(&REJECT_MAGIC);
        b.extend_from_slice(&RDMA_PROTOCOL_VERSION.to_le_bytes());
        b.extend_from_slice(&(cut as u16).to_le_bytes());
        b.extend_from_slice(&reason.as_bytes()[..cut]);
        b
    }

    /// The reason of a hacserve reject, if the private data is one.
    pub fn decode_reject(b: &[u8]) -> Option<String> {
        if b.len() < 8 || b[0..4] != REJECT_MAGIC {
            return None;
        }
        let n = (u16_at(b, 6) as usize).min(b.len() - 8);
        Some(String::from_utf8_lossy(&b[8..8 + n]).into_owned())
    }
}

/// wr_id tags: receives and sends are told apart by the top bit.
const WR_SEND: u64 = 1 << 63;

fn rdma_err(text: impl Into<String>) -> TransportError {
    TransportError::Rdma(RdmaError::Other(text.into()))
}

/// Resolves `host:port` to the first address (IPv4 preferred).
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr, TransportError> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| rdma_err(format!("cannot resolve {host}: {e}")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| rdma_err(format!("{host} has no address")))
}

/// Writes a reply straight into a staging slot (its size bounds every reply, see
/// [`wire::response_slot_size`]).
struct SlotWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl ReplyBuffer for SlotWriter<'_> {
    fn prepare(&mut self, len: usize) -> &mut [u8] {
        // Validated at the handshake and per request: a reply never exceeds the slot.
        self.len = len.min(self.buf.len());
        &mut self.buf[..self.len]
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

// ---------------------------------------------------------------------------------------------
// Server.

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

    /// Stages a reply to the request `req` holds with `write` and writes it to the client's
    /// response slot; the request slot is free once the reply is staged. Returns the reply's
    /// header (for the accounting) and whether the post worked.
    fn reply_with<R>(
        &self,
        req: SlotToken,
        write: impl FnOnce(&mut SlotWriter<'_>) -> R,
    ) -> (R, [u8; HEADER_LEN], Result<(), TransportError>) {
        let slot = req.slot();
        // Only the holder of the request slot stages into the staging slot of that index, and
        // its previous reply was delivered before the client could send this request, so the
        // NIC no longer reads it.
        let mut stage = self.ep.ring(STAGE_BUF).claim(slot);
        let Some(buf) = stage.as_mut().map(SlotToken::bytes_mut) else {
            return (
                write(&mut SlotWriter {
                    buf: &mut [],
                    len: 0,
                }),
                [0; HEADER_LEN],
                Err(rdma_err("staging slot out of range or busy")),
            );
        };
        let mut w = SlotWriter { buf, len: 0 };
        let r = write(&mut w);
        let len = w.len;
        let mut head = [0u8; HEADER_LEN];
        if len >= HEADER_LEN {
            head.copy_from_slice(&w.buf[..HEADER_LEN]);
        }
        // The reply is staged: the request slot is free for the client's next request.
        drop(req);
        let off = slot as usize * self.resp_slot_size;
        let sent = self.post_reply(slot, off, len);
        (r, head, sent)
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

/// A request waiting in its ring slot (held by `req` until the reply is staged or the job
/// is dropped).
pub struct RdmaJob {
    conn: Arc<ServerConn>,
    req: SlotToken,
    len: u32,
    received: u64,
}

impl ServerJob for RdmaJob {
    fn message(&self) -> &[u8] {
        self.conn.request(&self.req, self.len as usize)
    }
    fn received_ns(&self) -> u64 {
        self.received
    }
}

/// A worker's way back: stage the reply and write it to the client (posting a send is
/// thread-safe, so workers post on the client's QP directly).
#[derive(Default)]
pub struct RdmaReplySink;

impl ReplySink<RdmaJob> for RdmaReplySink {
    fn reply(&mut self, job: RdmaJob, reply: &[u8]) -> Result<(), TransportError> {
        let (_, _, sent) = job.conn.reply_with(job.req, |w| {
            let out = w.prepare(reply.len());
            let n = out.len();
            out.copy_from_slice(&reply[..n]);
        });
        sent
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Addressing {
    #[default]
    Host,
    /// On this GPU: clients' RDMA writes land in device memory (registered through dma-buf,
    /// else nvidia-peermem). The receive loop copies each request's bytes to a host mirror
    /// of the slot for validation and the CPU-side stages.
    Gpu(usize),
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
    /// Queue every well-sized request for the workers, echoes and bad headers included
    /// (rdma_proxy: the backend answers them, so the proxy stays transparent).
    forward_all: bool,
    /// With [`Addressing::Gpu`]: the stream request rings are allocated and read on.
    gpu_stream: Option<Arc<cu::CudaStream>>,
}

impl RdmaServer {
    /// Loads the RDMA libraries, checks for a device and listens on `addr` (port 0 = any).
    pub fn listen(addr: SocketAddr, cfg: RdmaServerConfig) -> Result<Self, TransportError> {
        let rdma = Rdma::load()?;
        let gpu_stream = match cfg.addressing {
            Addressing::Host => None,
            Addressing::Gpu(ordinal) => Some(
                cuda::driver(ordinal)
                    .and_then(|ctx| Ok(ctx.new_stream()?))
                    .map_err(|e| rdma_err(format!("GPU addressing on GPU {ordinal}: {e}")))?,
            ),
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
            forward_all: false,
            gpu_stream,
        })
    }

    /// Hands every request to the workers untouched instead of answering echoes and header
    /// rejections in the receive loop (for a forwarding role such as rdma_proxy).
    pub fn forward_all(&mut self, on: bool) {
        self.forward_all = on;
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

    /// Receives requests until a stop is requested (or, without keep-alive, until the last
    /// client left): answers rejections and echoes at once, queues the rest for the workers.
    /// Returns its own per-request records (worker id `u32::MAX`).
    pub fn run(
        &mut self,
        queue: &WorkQueue<RdmaJob>,
        opts: &ServerOptions,
        probe: &WorkerProbe,
    ) -> Result<Vec<ServerRecord>, TransportError> {
        let mode = opts.poll_mode;
        let mut wcs = [WorkCompletion::default(); 32];
        let mut error_text = String::with_capacity(256);
        let mut overload = Vec::with_capacity(HEADER_LEN + 256);
        let mut log = Vec::with_capacity(if opts.log_folder.is_some() {
            opts.log_capacity
        } else {
            0
        });
        let mut idle: u32 = 0;
        let mut iter: u64 = 0;
        let mut dead: Vec<usize> = Vec::with_capacity(16);
        while !signal::stop_requested() {
            iter += 1;
            if iter % 256 == 0 || self.conns.is_empty() || (mode == PollMode::Block && idle > 64) {
                self.cm_events(0, opts.max_payload)?;
            }
            if !self.cfg.keep_alive && self.served_any && self.conns.is_empty() {
                log::info!("last client left and keep-alive is off: stopping");
                break;
            }
            let mut progress = false;
            dead.clear();
            for (ci, conn) in self.conns.iter().enumerate() {
                let n = match conn.ep.poll(&mut wcs) {
                    Ok(n) => n,
                    Err(e) => {
                        log::error!("client {}: polling failed: {e}", conn.client_id);
                        dead.push(ci);
                        continue;
                    }
                };
                if n > 0 {
                    progress = true;
                }
                for wc in &wcs[..n] {
                    if wc.status() != WcStatus::Success {
                        if wc.status() != WcStatus::WrFlushErr && conn.alive.load(Ordering::Acquire)
                        {
                            log::warn!(
                                "client {}: work completion failed: {}; disconnecting it",
                                conn.client_id,
                                conn.ep.wc_status_str(wc.status())
                            );
                        }
                        queue
                            .counters
                            .transport_errors
                            .fetch_add(1, Ordering::Relaxed);
                        dead.push(ci);
                        break;
                    }
                    if wc.opcode() != WcOpcode::RecvRdmaWithImm {
                        continue; // a reply's send completion
                    }
                    let received = realtime_ns();
                    if !self.one_request(
                        conn,
                        wc,
                        received,
                        queue,
                        opts,
                        probe,
                        &mut log,
                        &mut error_text,
                        &mut overload,
                    ) {
                        dead.push(ci);
                        break;
                    }
                    // Reposted after the request was answered or queued, off the reply's
                    // critical path: the spare receive (depth + 1 posted) takes the client's
                    // next request if it lands in between.
                    if let Err(e) = conn.ep.post_recv_empty(wc.wr_id()) {
                        log::error!("client {}: reposting a receive: {e}", conn.client_id);
                        dead.push(ci);
                        break;
                    }
                }
            }
            if !dead.is_empty() {
                dead.sort_unstable();
                dead.dedup();
                for &i in dead.iter().rev() {
                    let c = self.conns.swap_remove(i);
                    c.alive.store(false, Ordering::Release);
                    let _ = c.ep.disconnect();
                    log::warn!("client {} disconnected by the server", c.client_id);
                }
            }
            if progress {
                idle = 0;
                continue;
            }
            idle = idle.saturating_add(1);
            match mode {
                PollMode::Busy => std::hint::spin_loop(),
                PollMode::Block => {
                    if idle > 64 {
                        // No completion channel yet: short sleeps while idle.
                        std::thread::sleep(Duration::from_micros(if self.conns.is_empty() {
                            2000
                        } else {
                            50
                        }));
                    }
                }
            }
        }
        for c in &self.conns {
            c.alive.store(false, Ordering::Release);
            let _ = c.ep.disconnect();
        }
        Ok(log)
    }

    /// One request completion; false when the client must be disconnected.
    #[allow(clippy::too_many_arguments)]
    fn one_request(
        &self,
        conn: &Arc<ServerConn>,
        wc: &WorkCompletion,
        received: u64,
        queue: &WorkQueue<RdmaJob>,
        opts: &ServerOptions,
        probe: &WorkerProbe,
        log: &mut Vec<ServerRecord>,
        error_text: &mut String,
        overload: &mut Vec<u8>,
    ) -> bool {
        let Some(imm) = wc.imm() else {
            log::warn!(
                "client {}: write without an immediate; disconnecting it",
                conn.client_id
            );
            return false;
        };
        let (slot, len) = decode_imm(imm);
        if slot >= conn.depth {
            log::warn!(
                "client {}: immediate names slot {slot} of a {}-slot ring; disconnecting it",
                conn.client_id,
                conn.depth
            );
            return false;
        }
        let Some(mut req) = conn.ep.ring(REQ_BUF).claim(slot) else {
            log::warn!(
                "client {}: request into slot {slot} while it is still being served (no credit); disconnecting it",
                conn.client_id
            );
            return false;
        };
        let len = len as usize;
        if let Err(e) = conn.mirror_from_gpu(&mut req, len.min(conn.slot_size)) {
            log::error!(
                "client {}: reading slot {slot} from GPU memory failed ({e}); disconnecting it",
                conn.client_id
            );
            return false;
        }
        queue.counters.received.fetch_add(1, Ordering::Relaxed);
        if len > conn.slot_size {
            // Reject: the length cannot be right, the bytes are not read beyond the slot.
            let head = conn.request(&req, HEADER_LEN);
            let (client, request) = Header::salvage_ids(head);
            error_text.clear();
            error_text.push_str(&format!(
                "immediate length {len} exceeds the {}-byte slot",
                conn.slot_size
            ));
            let (_, reply_head, sent) = conn.reply_with(req, |w| {
                encode_error(
                    w,
                    client,
                    request,
                    Task::Echo,
                    ErrorCode::PayloadTooLarge,
                    error_text,
                )
            });
            account(
                &queue.counters,
                probe,
                log,
                u32::MAX,
                &reply_head,
                received,
                Outcome::Rejected(ErrorCode::PayloadTooLarge),
                error_text,
                sent,
                opts.debug,
                "receive loop",
            );
            return true;
        }
        let max_payload = opts.max_payload.min(conn.slot_size - HEADER_LEN);
        let msg = conn.request(&req, len);
        let priority = opts.priority_clients
            && msg.len() >= HEADER_LEN
            && u32::from_le_bytes([msg[28], msg[29], msg[30], msg[31]]) & FLAG_PRIORITY != 0;
        let triage = if self.forward_all {
            None
        } else {
            Some(conn.reply_with_if(&req, |w| {
                answer_without_engine(msg, received, max_payload, w, error_text)
            }))
        };
        if let Some((Triage::Answered(outcome), reply_head, sent)) = triage {
            account(
                &queue.counters,
                probe,
                log,
                u32::MAX,
                &reply_head,
                received,
                outcome,
                error_text,
                sent,
                opts.debug,
                "receive loop",
            );
            return true;
        }
        let job = RdmaJob {
            conn: conn.clone(),
            req,
            len: len as u32,
            received,
        };
        if let Err(job) = queue.push(job, priority) {
            queue.counters.overloaded.fetch_add(1, Ordering::Relaxed);
            overloaded_reply(job.message(), overload);
            log::warn!("queue full: answering Overloaded");
            let (_, _, sent) = job.conn.reply_with(job.req, |w| {
                let out = w.prepare(overload.len());
                let n = out.len();
                out.copy_from_slice(&overload[..n]);
            });
            if let Err(e) = sent {
                log::warn!("Overloaded reply could not be delivered: {e}");
            }
        }
        true
    }
}

impl ServerConn {
    /// Like [`Self::reply_with`], for the engine-free triage: posts only when it answered.
    /// The receive loop drops `req` after an answer (it handles the client's next request
    /// into this slot only after that, on the same thread).
    fn reply_with_if(
        &self,
        req: &SlotToken,
        triage: impl FnOnce(&mut SlotWriter<'_>) -> Triage,
    ) -> (Triage, [u8; HEADER_LEN], Result<(), TransportError>) {
        let slot = req.slot();
        // As in reply_with: the holder of the request slot stages into this staging slot.
        let mut stage = self.ep.ring(STAGE_BUF).claim(slot);
        let Some(buf) = stage.as_mut().map(SlotToken::bytes_mut) else {
            return (
                Triage::Answered(Outcome::Rejected(ErrorCode::Internal)),
                [0; HEADER_LEN],
                Err(rdma_err("staging slot out of range")),
            );
        };
        let mut w = SlotWriter { buf, len: 0 };
        let t = triage(&mut w);
        if matches!(t, Triage::NeedsWorker(_)) {
            return (t, [0; HEADER_LEN], Ok(()));
        }
        let len = w.len;
        let mut head = [0u8; HEADER_LEN];
        if len >= HEADER_LEN {
            head.copy_from_slice(&w.buf[..HEADER_LEN]);
        }
        let off = slot as usize * self.resp_slot_size;
        let sent = self.post_reply(slot, off, len);
        (t, head, sent)
    }
}

// ---------------------------------------------------------------------------------------------
// Client.

const SEND_BUF: usize = 0;
const RESP_BUF: usize = 1;

/// Client settings.
#[derive(Debug, Clone)]
pub struct RdmaClientConfig {
    pub client_id: u32,
    /// Request slot size (bounds header + payload).
    pub slot_size: u32,
    /// Ring depth (requests in flight).
    pub depth: u32,
    pub timeout: Duration,
    pub mode: PollMode,
}

/// Client end: one RC connection, a registered send ring and response ring.
pub struct RdmaClient {
    channel: Arc<EventChannel>,
    ep: RcEndpoint,
    cfg: RdmaClientConfig,
    accept: AcceptReply,
    resp_slot_size: usize,
    next_slot: u32,
    /// A send slot's token is its credit: held from the send until the reply arrives.
    in_flight: Vec<Option<SlotToken>>,
    /// The next send slot, claimed by [`RdmaClient::next_send_slot`] and not yet sent.
    preparing: Option<SlotToken>,
    /// Every response slot, held for the connection's life: only the server writes them, each
    /// in answer to the request in the send slot of the same index.
    responses: Vec<SlotToken>,
    wc: [WorkCompletion; 1],
}

fn wait_event(
    channel: &Arc<EventChannel>,
    want: CmEventKind,
    deadline: Instant,
    what: &str,
) -> Result<CmEvent, TransportError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(rdma_err(format!("timed out waiting for {what}")));
        }
        if signal::stop_requested() {
            return Err(TransportError::Stopped);
        }
        let Some(ev) = channel.next(left.as_millis().min(200) as i32)? else {
            continue;
        };
        if ev.kind == want {
            return Ok(ev);
        }
        if ev.kind == CmEventKind::Rejected {
            return Err(match decode_reject(&ev.private_data) {
                Some(reason) => rdma_err(format!("the server refused the connection: {reason}")),
                None => rdma_err(format!(
                    "connection rejected (status {}) while waiting for {what}: is rdma_server listening there?",
                    ev.status
                )),
            });
        }
        return Err(rdma_err(format!(
            "{} (status {}) while waiting for {what}",
            ev.name, ev.status
        )));
    }
}

impl RdmaClient {
    /// Loads the RDMA libraries, resolves `host:port` and connects with rdma_cm.
    pub fn connect(host: &str, port: u16, cfg: RdmaClientConfig) -> Result<Self, TransportError> {
        let rdma = Rdma::load()?;
        if cfg.depth == 0 || cfg.depth > MAX_DEPTH {
            return Err(rdma_err(format!("ring depth must be 1..={MAX_DEPTH}")));
        }
        if !(MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&cfg.slot_size) {
            return Err(rdma_err(format!(
                "slot size must be {MIN_SLOT_SIZE}..={MAX_SLOT_SIZE} bytes"
            )));
        }
        let addr = resolve(host, port)?;
        let deadline = Instant::now() + cfg.timeout;
        let channel = EventChannel::new(rdma)?;
        let id = CmId::new(rdma, &channel)?;
        id.resolve_addr(&addr, 2000)?;
        wait_event(
            &channel,
            CmEventKind::AddrResolved,
            deadline,
            "address resolution",
        )?;
        id.resolve_route(2000)?;
        wait_event(
            &channel,
            CmEventKind::RouteResolved,
            deadline,
            "route resolution",
        )?;
        let depth = cfg.depth;
        let sizes = QpSizes {
            cq_entries: 2 * depth + 8,
            max_send_wr: depth + 2,
            max_recv_wr: depth,
        };
        let mut ep = RcEndpoint::create(rdma, id, sizes)?;
        let resp_slot_size = response_slot_size(cfg.slot_size) as usize;
        ep.register_ring(cfg.slot_size as usize, depth, AccessFlags::LOCAL_WRITE)?;
        ep.register_ring(
            resp_slot_size,
            depth,
            AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE,
        )?;
        let responses = (0..depth)
            .map(|slot| ep.ring(RESP_BUF).claim(slot))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| rdma_err("response ring shorter than its depth"))?;
        for i in 0..depth {
            ep.post_recv_empty(i as u64)?;
        }
        let req = ConnectRequest {
            client_id: cfg.client_id,
            slot_size: cfg.slot_size,
            depth,
            resp_slot_size: resp_slot_size as u32,
            resp_addr: ep.buf(RESP_BUF).addr(),
            resp_rkey: ep.buf(RESP_BUF).rkey(),
        };
        ep.connect(&req.encode())?;
        let ev = wait_event(
            &channel,
            CmEventKind::Established,
            deadline,
            "the server to accept",
        )?;
        let accept = AcceptReply::decode(&ev.private_data)
            .map_err(|e| TransportError::Malformed(format!("server's accept data: {e}")))?;
        if accept.depth != depth || accept.slot_size != cfg.slot_size {
            return Err(TransportError::Malformed(format!(
                "server granted {} x {} B, {} x {} B asked",
                accept.depth, accept.slot_size, depth, cfg.slot_size
            )));
        }
        Ok(RdmaClient {
            channel,
            ep,
            in_flight: (0..depth).map(|_| None).collect(),
            preparing: None,
            responses,
            cfg,
            accept,
            resp_slot_size,
            next_slot: 0,
            wc: [WorkCompletion::default()],
        })
    }

    /// The slot the next request goes into.
    pub fn next_slot(&self) -> u32 {
        self.next_slot
    }

    /// The server's payload limit for this connection.
    pub fn max_payload(&self) -> usize {
        self.accept.max_payload as usize
    }

    /// Sends `msg` into the next slot with an arbitrary immediate (tests of the server's
    /// validation: a slot outside the ring, a length beyond the slot).
    pub fn send_with_imm(&mut self, msg: &[u8], imm: u32) -> Result<u32, TransportError> {
        let size = self.cfg.slot_size as usize;
        if msg.len() > size {
            return Err(rdma_err(format!(
                "request of {} bytes does not fit the {size}-byte slot (--slot-size)",
                msg.len()
            )));
        }
        self.next_send_slot()?[..msg.len()].copy_from_slice(msg);
        self.post_next(msg.len(), imm)
    }

    /// The next slot's registered send buffer (the whole slot), to build a request in place
    /// and send it with [`Self::send_prepared`] without copying it; fails without a credit.
    /// The slot keeps its bytes between uses: a caller sending similar requests may rewrite
    /// only what changes (e.g. the header).
    pub fn next_send_slot(&mut self) -> Result<&mut [u8], TransportError> {
        let slot = self.next_slot;
        if self.in_flight[slot as usize].is_some() {
            return Err(rdma_err(format!(
                "no credit: all {} slots have a request in flight",
                self.cfg.depth
            )));
        }
        // The slot's credit is back (its reply arrived), so the NIC no longer reads it.
        if self.preparing.as_ref().map(SlotToken::slot) != Some(slot) {
            self.preparing = self.ep.ring(SEND_BUF).claim(slot);
        }
        self.preparing
            .as_mut()
            .map(SlotToken::bytes_mut)
            .ok_or_else(|| rdma_err("send slot out of range"))
    }

    /// Sends the first `len` bytes of the next slot, written there through
    /// [`Self::next_send_slot`]; returns the slot.
    pub fn send_prepared(&mut self, len: usize) -> Result<u32, TransportError> {
        if len > self.cfg.slot_size as usize {
            return Err(rdma_err(format!(
                "request of {len} bytes does not fit the {}-byte slot (--slot-size)",
                self.cfg.slot_size
            )));
        }
        let imm = encode_imm(self.next_slot, len as u32)
            .ok_or_else(|| rdma_err(format!("request of {len} bytes is too long")))?;
        self.post_next(len, imm)
    }

    /// Writes the first `len` bytes of the next slot (credit checked here) to the server.
    fn post_next(&mut self, len: usize, imm: u32) -> Result<u32, TransportError> {
        let slot = self.next_slot;
        let credit = match self.preparing.take() {
            Some(t) if t.slot() == slot => Some(t),
            _ => self.ep.ring(SEND_BUF).claim(slot),
        };
        let Some(credit) = credit.filter(|_| self.in_flight[slot as usize].is_none()) else {
            return Err(rdma_err(format!(
                "no credit: all {} slots have a request in flight",
                self.cfg.depth
            )));
        };
        let off = credit.offset();
        let remote = self.accept.req_addr + off as u64;
        self.ep.post_write_imm(
            WR_SEND | slot as u64,
            SEND_BUF,
            off,
            len,
            remote,
            self.accept.req_rkey,
            imm,
        )?;
        self.in_flight[slot as usize] = Some(credit);
        self.next_slot = (slot + 1) % self.cfg.depth;
        Ok(slot)
    }

    /// Fails once the server has closed the connection (a DISCONNECTED event is waiting).
    fn check_disconnect(&mut self) -> Result<(), TransportError> {
        while let Some(ev) = self.channel.next(0)? {
            if ev.kind == CmEventKind::Disconnected || ev.kind == CmEventKind::DeviceRemoval {
                return Err(rdma_err(format!(
                    "the server closed the connection ({})",
                    ev.name
                )));
            }
        }
        Ok(())
    }

    /// Whether the next slot is free, i.e. [`ClientTransport::send`] would not fail for lack
    /// of credit (slots are used round-robin, so one slow reply holds the ring).
    pub fn can_send(&self) -> bool {
        self.in_flight[self.next_slot as usize].is_none()
    }

    /// Requests sent whose reply has not arrived.
    pub fn outstanding(&self) -> usize {
        self.in_flight.iter().filter(|c| c.is_some()).count()
    }

    /// The ring depth (requests this connection may have in flight).
    pub fn depth(&self) -> u32 {
        self.cfg.depth
    }

    /// The request slot size (largest message `send` takes).
    pub fn slot_size(&self) -> usize {
        self.cfg.slot_size as usize
    }

    /// Non-blocking receive for pipelining callers (proxies): one poll of the completion
    /// queue; the reply's slot and bytes if one arrived. Call [`Self::poll_disconnect`] now
    /// and then to notice a server that went away while nothing is in flight.
    pub fn try_recv(&mut self) -> Result<Option<(u32, &[u8])>, TransportError> {
        let Some((slot, len)) = self.poll_reply()? else {
            return Ok(None);
        };
        let bytes = self.response(slot, len)?;
        Ok(Some((slot, bytes)))
    }

    /// Fails once the server has closed the connection.
    pub fn poll_disconnect(&mut self) -> Result<(), TransportError> {
        self.check_disconnect()
    }

    /// One poll: (slot, len) of a reply, or None when no reply completion was waiting.
    fn poll_reply(&mut self) -> Result<Option<(u32, usize)>, TransportError> {
        loop {
            let n = self.ep.poll(&mut self.wc)?;
            if n == 0 {
                return Ok(None);
            }
            let wc = self.wc[0];
            if wc.status() != WcStatus::Success {
                return Err(rdma_err(format!(
                    "work completion failed: {} (the server may have disconnected this client)",
                    self.ep.wc_status_str(wc.status())
                )));
            }
            if wc.opcode() != WcOpcode::RecvRdmaWithImm {
                continue; // a request's send completion
            }
            self.ep.post_recv_empty(wc.wr_id())?;
            let imm = wc
                .imm()
                .ok_or_else(|| TransportError::Malformed("reply without an immediate".into()))?;
            let (slot, len) = decode_imm(imm);
            let len = len as usize;
            if slot >= self.cfg.depth || self.in_flight[slot as usize].is_none() {
                return Err(TransportError::Malformed(format!(
                    "reply names slot {slot}, which has no request in flight"
                )));
            }
            if len > self.resp_slot_size {
                return Err(TransportError::ReplyTooLarge {
                    got: len,
                    max: self.resp_slot_size,
                });
            }
            // The credit returns: the send slot may be written again.
            self.in_flight[slot as usize] = None;
            return Ok(Some((slot, len)));
        }
    }

    /// The first `len` bytes of response slot `slot`, whose reply has arrived: no request
    /// for it is in flight, and none can be sent while the returned slice borrows self.
    fn response(&self, slot: u32, len: usize) -> Result<&[u8], TransportError> {
        self.responses
            .get(slot as usize)
            .and_then(|t| t.bytes().get(..len))
            .ok_or_else(|| rdma_err("response slot out of range"))
    }

    /// Waits for the next completion that carries a reply; returns (slot, len).
    fn wait_reply(&mut self) -> Result<(u32, usize), TransportError> {
        let start = Instant::now();
        let mut idle = 0u32;
        loop {
            if let Some(r) = self.poll_reply()? {
                return Ok(r);
            }
            if start.elapsed() > self.cfg.timeout {
                return Err(TransportError::Timeout(self.cfg.timeout.as_millis() as u64));
            }
            if signal::stop_requested() {
                return Err(TransportError::Stopped);
            }
            idle += 1;
            if idle % 256 == 0 {
                self.check_disconnect()?;
            }
            match self.cfg.mode {
                PollMode::Busy => std::hint::spin_loop(),
                PollMode::Block if idle > 64 => std::thread::sleep(Duration::from_micros(20)),
                PollMode::Block => std::thread::yield_now(),
            }
        }
    }
}

impl ClientTransport for RdmaClient {
    fn send(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        let imm = encode_imm(self.next_slot, msg.len() as u32)
            .ok_or_else(|| rdma_err(format!("request of {} bytes is too long", msg.len())))?;
        self.send_with_imm(msg, imm).map(|_| ())
    }

    fn recv(&mut self) -> Result<&[u8], TransportError> {
        let (slot, len) = self.wait_reply()?;
        self.response(slot, len)
    }
}

impl Drop for RdmaClient {
    fn drop(&mut self) {
        let _ = self.ep.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::wire::*;

    #[test]
    fn immediate_packs_slot_high_and_length_low() {
        assert_eq!(encode_imm(0, 0), Some(0));
        assert_eq!(encode_imm(1, 5), Some(0x0100_0005));
        assert_eq!(encode_imm(255, IMM_LEN_MASK), Some(u32::MAX));
        assert_eq!(encode_imm(256, 1), None);
        assert_eq!(encode_imm(0, 1 << 24), None);
        assert_eq!(decode_imm(0x0300_1234), (3, 0x1234));
        for (s, l) in [(0, 32), (7, 61_338), (255, 8 << 20)] {
            assert_eq!(decode_imm(encode_imm(s, l).unwrap()), (s, l));
        }
        // Every response slot length fits the immediate.
        assert!(response_slot_size(MAX_SLOT_SIZE) <= IMM_LEN_MASK);
        assert_eq!(MAX_DEPTH, 256);
    }

    fn req() -> ConnectRequest {
        ConnectRequest {
            client_id: 7,
            slot_size: 65536,
            depth: 16,
            resp_slot_size: response_slot_size(65536),
            resp_addr: 0x1122_3344_5566_7788,
            resp_rkey: 0xaabb_ccdd,
        }
    }

    #[test]
    fn connect_request_layout_and_validation() {
        let b = req().encode();
        assert_eq!(b.len(), CONNECT_LEN);
        const { assert!(CONNECT_LEN <= 56, "IB CM REQ private data limit") };
        assert_eq!(&b[0..4], b"HCRQ");
        assert_eq!(&b[4..6], &[1, 0]);
        assert_eq!(&b[8..12], &7u32.to_le_bytes());
        assert_eq!(&b[12..16], &65536u32.to_le_bytes());
        assert_eq!(&b[16..20], &16u32.to_le_bytes());
        assert_eq!(&b[24..32], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[32..36], &0xaabb_ccddu32.to_le_bytes());
        assert_eq!(ConnectRequest::decode(&b), Ok(req()));
        // IB CM pads private data with zeros: trailing bytes are ignored.
        let mut padded = b.to_vec();
        padded.resize(56, 0);
        assert_eq!(ConnectRequest::decode(&padded), Ok(req()));
        assert_eq!(
            ConnectRequest::decode(&b[..20]),
            Err(HandshakeError::Short { got: 20, want: 36 })
        );
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            ConnectRequest::decode(&bad),
            Err(HandshakeError::BadMagic(_))
        ));
        let mut bad = b;
        bad[4] = 2;
        assert_eq!(
            ConnectRequest::decode(&bad),
            Err(HandshakeError::BadVersion(2))
        );
        for (depth, slot, resp, want) in [
            (0, 65536, response_slot_size(65536), "depth"),
            (257, 65536, response_slot_size(65536), "depth"),
            (4, 100, 1000, "slot"),
            (4, MAX_SLOT_SIZE + 1, u32::MAX, "slot"),
            (4, 65536, 65536, "resp"),
        ] {
            let r = ConnectRequest {
                depth,
                slot_size: slot,
                resp_slot_size: resp,
                ..req()
            };
            let e = ConnectRequest::decode(&r.encode()).unwrap_err();
            let ok = match want {
                "depth" => matches!(e, HandshakeError::BadDepth(_)),
                "slot" => matches!(e, HandshakeError::BadSlotSize(_)),
                _ => matches!(e, HandshakeError::BadResponseSlot { .. }),
            };
            assert!(ok, "{want}: {e}");
        }
    }

    #[test]
    fn accept_and_reject_layouts() {
        let a = AcceptReply {
            slot_size: 4096,
            depth: 8,
            req_addr: 0xdead_beef_0000,
            req_rkey: 42,
            max_payload: 4064,
        };
        let b = a.encode();
        assert_eq!(b.len(), ACCEPT_LEN);
        assert_eq!(&b[0..4], b"HCRA");
        assert_eq!(&b[16..24], &0xdead_beef_0000u64.to_le_bytes());
        assert_eq!(&b[24..28], &42u32.to_le_bytes());
        assert_eq!(AcceptReply::decode(&b), Ok(a));
        let mut padded = b.to_vec();
        padded.resize(196, 0);
        assert_eq!(AcceptReply::decode(&padded), Ok(a));
        assert!(AcceptReply::decode(&req().encode()).is_err());

        let r = encode_reject("ring too large");
        assert_eq!(&r[0..4], b"HCRJ");
        assert_eq!(decode_reject(&r).as_deref(), Some("ring too large"));
        let long = "é".repeat(200);
        let r = encode_reject(&long);
        assert!(r.len() <= 148);
        assert!(decode_reject(&r).unwrap().chars().all(|c| c == 'é'));
        assert_eq!(decode_reject(b"nothing here"), None);
        assert_eq!(decode_reject(&[]), None);
    }
}

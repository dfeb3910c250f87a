//! A safe layer over rdma_cm + verbs for one reliable-connected (RC) queue pair per
//! connection, the pieces hacserve's RDMA transport needs: an event channel, communication
//! ids (listen / resolve / accept / connect with private data), and an [`RcEndpoint`] that
//! owns a connection's PD, CQ, QP and registered buffers and posts RDMA WRITE_WITH_IMM and
//! zero-length receives.
//!
//! Ownership and teardown: every [`CmId`] keeps its [`EventChannel`] alive (an `Arc`), so the
//! channel is destroyed after the last id on it. [`RcEndpoint`] destroys, in this order: QP,
//! memory regions, CQ, PD, then the id.

use std::ffi::{c_int, c_void};
use std::net::SocketAddr;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use thiserror::Error;

use crate::dl::DlError;
use crate::rdma_mem::{DeviceRegisterError, GpuRegisteredBuf, RegisteredBuf};
use crate::rdmacm::{
    rdma_cm_event, rdma_cm_id, rdma_conn_param, rdma_event_channel, CmError, RdmaCm,
    RDMA_CM_EVENT_CONNECT_REQUEST, RDMA_PS_TCP,
};
use crate::verbs::{
    ibv_cq, ibv_pd, ibv_qp_init_attr, ibv_recv_wr, ibv_send_wr, ibv_sge, ibv_wc, post_recv,
    post_send, Verbs, VerbsError, IBV_QPT_RC, IBV_SEND_INLINE, IBV_SEND_SIGNALED,
};

/// Anything that can go wrong below the transport.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RdmaError {
    /// libibverbs or librdmacm is not installed.
    #[error("RDMA unavailable: {0}")]
    Library(#[from] DlError),
    /// The libraries are there but the machine has no usable RDMA device.
    #[error("RDMA unavailable: no RDMA device ({0})")]
    NoDevice(String),
    #[error(transparent)]
    Cm(#[from] CmError),
    #[error(transparent)]
    Verbs(#[from] VerbsError),
    /// GPU memory could not be registered (GPUDirect RDMA).
    #[error(transparent)]
    GpuMemory(#[from] DeviceRegisterError),
    #[error("{0}")]
    Other(String),
}

/// Both libraries, loaded once per process.
#[derive(Debug, Clone, Copy)]
pub struct Rdma {
    pub verbs: &'static Verbs,
    pub cm: &'static RdmaCm,
}

impl Rdma {
    /// Loads libibverbs and librdmacm, and checks that an RDMA device exists: the error names
    /// what is missing (library, kernel support, device).
    pub fn load() -> Result<Rdma, RdmaError> {
        let verbs = Verbs::load()?;
        let cm = RdmaCm::load()?;
        match verbs.device_names() {
            Ok(names) if names.is_empty() => {
                return Err(RdmaError::NoDevice(
                    "ibv_get_device_list found none; load rdma_rxe or attach a NIC".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(RdmaError::NoDevice(e.to_string())),
        }
        Ok(Rdma { verbs, cm })
    }
}

/// An rdma_cm event channel (destroyed when the last handle and id drop).
#[derive(Debug)]
pub struct EventChannel {
    cm: &'static RdmaCm,
    ch: NonNull<rdma_event_channel>,
}

// SAFETY: a channel is a file descriptor wrapper; librdmacm calls on it are thread-safe.
unsafe impl Send for EventChannel {}
// SAFETY: as above.
unsafe impl Sync for EventChannel {}

impl EventChannel {
    pub fn new(rdma: Rdma) -> Result<Arc<EventChannel>, RdmaError> {
        let ch = rdma.cm.create_event_channel().map_err(|e| {
            if e.errno == libc::ENODEV || e.errno == libc::ENOENT || e.errno == libc::ENOSYS {
                RdmaError::NoDevice(e.to_string())
            } else {
                RdmaError::Cm(e)
            }
        })?;
        Ok(Arc::new(EventChannel { cm: rdma.cm, ch }))
    }

    fn fd(&self) -> c_int {
        // SAFETY: ch is live until Drop; fd is never changed.
        unsafe { self.ch.as_ref().fd }
    }

    /// Waits up to `timeout_ms` (0 = just look, -1 = forever) for the next CM event, acks it
    /// and returns a copy of what it carried. A CONNECT_REQUEST's new id comes back owned.
    pub fn next(self: &Arc<Self>, timeout_ms: i32) -> Result<Option<CmEvent>, RdmaError> {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is one live pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let e = CmError::last("poll");
            if e.errno == libc::EINTR {
                return Ok(None);
            }
            return Err(e.into());
        }
        if rc == 0 {
            return Ok(None);
        }
        let mut ev: *mut rdma_cm_event = ptr::null_mut();
        // SAFETY: the channel is live; ev receives an event owned by librdmacm until acked.
        // The fd is readable, so this does not block.
        CmError::check("rdma_get_cm_event", unsafe {
            (self.cm.rdma_get_cm_event)(self.ch.as_ptr(), &mut ev)
        })?;
        let Some(evp) = NonNull::new(ev) else {
            return Err(RdmaError::Other(
                "rdma_get_cm_event returned no event".into(),
            ));
        };
        // SAFETY: a live, unacked event.
        let e = unsafe { evp.as_ref() };
        let kind = e.event;
        // SAFETY: param.conn is what librdmacm fills for every event of an RC (TCP port
        // space) id; for events without private data its pointer is null and we get [].
        let private = unsafe { e.conn_private_data() }.to_vec();
        let out = CmEvent {
            kind,
            name: self.cm.event_str(kind),
            status: e.status,
            id: e.id as usize,
            listen_id: e.listen_id as usize,
            private_data: private,
            new_id: None,
        };
        let new_raw = e.id;
        // SAFETY: acked exactly once; nothing from the event is used afterwards (copied).
        CmError::check("rdma_ack_cm_event", unsafe {
            (self.cm.rdma_ack_cm_event)(ev)
        })?;
        let mut out = out;
        if kind == RDMA_CM_EVENT_CONNECT_REQUEST {
            if let Some(id) = NonNull::new(new_raw) {
                // The new id of a connection request belongs to the application (destroyed
                // with rdma_destroy_id); it stays valid after the ack.
                out.new_id = Some(CmId {
                    cm: self.cm,
                    id,
                    channel: self.clone(),
                });
            }
        }
        Ok(Some(out))
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on the channel holds an Arc to it, so none is left; destroyed once.
        unsafe { (self.cm.rdma_destroy_event_channel)(self.ch.as_ptr()) };
    }
}

/// A CM event, copied out and already acknowledged.
#[derive(Debug)]
pub struct CmEvent {
    pub kind: u32,
    pub name: String,
    pub status: i32,
    /// The id the event is for, as an opaque handle (compare with [`CmId::handle`]).
    pub id: usize,
    pub listen_id: usize,
    pub private_data: Vec<u8>,
    /// CONNECT_REQUEST only: the new connection's id, owned by the receiver.
    pub new_id: Option<CmId>,
}

/// An owned rdma_cm id (a "socket" of rdma_cm).
#[derive(Debug)]
pub struct CmId {
    cm: &'static RdmaCm,
    id: NonNull<rdma_cm_id>,
    channel: Arc<EventChannel>,
}

// SAFETY: librdmacm calls on an id are thread-safe; the id is only destroyed in Drop.
unsafe impl Send for CmId {}
// SAFETY: as above.
unsafe impl Sync for CmId {}

fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

impl CmId {
    /// A new RC (port space TCP) id on `channel`.
    pub fn new(rdma: Rdma, channel: &Arc<EventChannel>) -> Result<CmId, RdmaError> {
        let mut id: *mut rdma_cm_id = ptr::null_mut();
        // SAFETY: the channel is live; id receives a new id owned by us.
        CmError::check("rdma_create_id", unsafe {
            (rdma.cm.rdma_create_id)(channel.ch.as_ptr(), &mut id, ptr::null_mut(), RDMA_PS_TCP)
        })?;
        let id = NonNull::new(id)
            .ok_or_else(|| RdmaError::Other("rdma_create_id returned no id".into()))?;
        Ok(CmId {
            cm: rdma.cm,
            id,
            channel: channel.clone(),
        })
    }

    /// An opaque handle identifying this id in [`CmEvent::id`].
    pub fn handle(&self) -> usize {
        self.id.as_ptr() as usize
    }

    /// Whether the id is bound to a device (after resolve or on an incoming connection).
    pub fn has_device(&self) -> bool {
        // SAFETY: the id is live.
        !unsafe { self.id.as_ref() }.verbs.is_null()
    }

    /// `rdma_bind_addr` + `rdma_listen`; returns the bound port (useful with port 0).
    pub fn listen(&self, addr: &SocketAddr, backlog: i32) -> Result<u16, RdmaError> {
        let (mut ss, _) = sockaddr_of(addr);
        // SAFETY: the id is live; ss is a valid sockaddr of the right family.
        CmError::check("rdma_bind_addr", unsafe {
            (self.cm.rdma_bind_addr)(self.id.as_ptr(), &mut ss as *mut _ as *mut libc::sockaddr)
        })?;
        // SAFETY: the id is live and bound.
        CmError::check("rdma_listen", unsafe {
            (self.cm.rdma_listen)(self.id.as_ptr(), backlog)
        })?;
        // SAFETY: route.addr.src is filled by rdma_bind_addr; the port sits at the same offset
        // for sockaddr_in and sockaddr_in6.
        let port = unsafe { self.id.as_ref().route.addr.src.sin.sin_port };
        Ok(u16::from_be(port))
    }

    /// `rdma_resolve_addr` (the caller waits for ADDR_RESOLVED).
    pub fn resolve_addr(&self, dst: &SocketAddr, timeout_ms: i32) -> Result<(), RdmaError> {
        let (mut ss, _) = sockaddr_of(dst);
        // SAFETY: the id is live; ss is a valid sockaddr; a null source lets rdma_cm choose.
        CmError::check("rdma_resolve_addr", unsafe {
            (self.cm.rdma_resolve_addr)(
                self.id.as_ptr(),
                ptr::null_mut(),
                &mut ss as *mut _ as *mut libc::sockaddr,
                timeout_ms,
            )
        })?;
        Ok(())
    }

    /// `rdma_resolve_route` (the caller waits for ROUTE_RESOLVED).
    pub fn resolve_route(&self, timeout_ms: i32) -> Result<(), RdmaError> {
        // SAFETY: the id is live with a resolved address.
        CmError::check("rdma_resolve_route", unsafe {
            (self.cm.rdma_resolve_route)(self.id.as_ptr(), timeout_ms)
        })?;
        Ok(())
    }

    /// `rdma_reject` with up to 148 bytes of private data (a reason for the peer).
    pub fn reject(&self, private: &[u8]) -> Result<(), RdmaError> {
        let len = private.len().min(148);
        // SAFETY: the id is live; private is readable for len bytes during the call.
        CmError::check("rdma_reject", unsafe {
            (self.cm.rdma_reject)(
                self.id.as_ptr(),
                private.as_ptr() as *const c_void,
                len as u8,
            )
        })?;
        Ok(())
    }

    /// The channel this id reports on.
    pub fn channel(&self) -> &Arc<EventChannel> {
        &self.channel
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: an id we own, destroyed once; its events were acked when received (next()).
        unsafe { (self.cm.rdma_destroy_id)(self.id.as_ptr()) };
    }
}

/// Queue sizes of an endpoint.
#[derive(Debug, Clone, Copy)]
pub struct QpSizes {
    pub cq_entries: u32,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
}

/// One RC connection's verbs resources: PD, CQ (send and receive), QP, registered buffers.
#[derive(Debug)]
pub struct RcEndpoint {
    rdma: Rdma,
    id: CmId,
    pd: NonNull<ibv_pd>,
    cq: NonNull<ibv_cq>,
    has_qp: bool,
    bufs: Vec<RegisteredBuf>,
    gpu_bufs: Vec<GpuRegisteredBuf>,
    /// Largest send the QP takes inline (copied into the work request: the NIC does not read
    /// the buffer by DMA afterwards), as the provider granted it; 0 where it granted none.
    max_inline: usize,
}

/// Inline data asked for at QP creation: a 64-byte request and its echo reply (32-byte header
/// + 96-byte body + payload) fit, as in perftest's latency tests.
const WANT_INLINE: u32 = 256;

// SAFETY: libibverbs objects (PD, CQ, QP) are thread-safe: providers lock inside post_send,
// post_recv and poll_cq; the buffers' bytes are only reachable through unsafe accessors.
unsafe impl Send for RcEndpoint {}
// SAFETY: as above.
unsafe impl Sync for RcEndpoint {}

impl RcEndpoint {
    /// Allocates a PD and a CQ on the id's device and creates an RC QP on the id (state INIT;
    /// rdma_accept/rdma_connect take it to RTS).
    pub fn create(rdma: Rdma, id: CmId, sizes: QpSizes) -> Result<RcEndpoint, RdmaError> {
        // SAFETY: the id is live.
        let ctx = unsafe { id.id.as_ref() }.verbs;
        if ctx.is_null() {
            return Err(RdmaError::Other(
                "the connection id has no device (address not resolved)".into(),
            ));
        }
        // SAFETY: ctx is the id's live device context.
        let pd = NonNull::new(unsafe { (rdma.verbs.ibv_alloc_pd)(ctx) })
            .ok_or_else(|| VerbsError::last("ibv_alloc_pd"))?;
        // SAFETY: ctx is live; no completion channel.
        let cq = unsafe {
            (rdma.verbs.ibv_create_cq)(
                ctx,
                sizes.cq_entries as c_int,
                ptr::null_mut(),
                ptr::null_mut(),
                0,
            )
        };
        let Some(cq) = NonNull::new(cq) else {
            let e = VerbsError::last("ibv_create_cq");
            // SAFETY: pd allocated above, no objects on it.
            unsafe { (rdma.verbs.ibv_dealloc_pd)(pd.as_ptr()) };
            return Err(e.into());
        };
        let mut ep = RcEndpoint {
            rdma,
            id,
            pd,
            cq,
            has_qp: false,
            bufs: Vec::new(),
            gpu_bufs: Vec::new(),
            max_inline: 0,
        };
        let mut attr = ibv_qp_init_attr {
            send_cq: cq.as_ptr(),
            recv_cq: cq.as_ptr(),
            qp_type: IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        attr.cap.max_send_wr = sizes.max_send_wr;
        attr.cap.max_recv_wr = sizes.max_recv_wr;
        attr.cap.max_send_sge = 1;
        attr.cap.max_recv_sge = 1;
        attr.cap.max_inline_data = WANT_INLINE;
        // SAFETY: id, pd and cq are live and on the same device; attr is a valid init attr.
        let with_inline = CmError::check("rdma_create_qp", unsafe {
            (rdma.cm.rdma_create_qp)(ep.id.id.as_ptr(), pd.as_ptr(), &mut attr)
        });
        if with_inline.is_err() {
            // A device with less (or no) inline space: plain sends.
            attr.cap.max_inline_data = 0;
            // SAFETY: as above; the failed call created no QP.
            CmError::check("rdma_create_qp", unsafe {
                (rdma.cm.rdma_create_qp)(ep.id.id.as_ptr(), pd.as_ptr(), &mut attr)
            })?;
        }
        // The provider writes the capabilities it granted back into attr.cap.
        ep.max_inline = attr.cap.max_inline_data as usize;
        ep.has_qp = true;
        Ok(ep)
    }

    /// Registers a new zeroed buffer of `len` bytes with `access`; returns its index.
    pub fn register(&mut self, len: usize, access: u32) -> Result<usize, RdmaError> {
        // SAFETY: the PD is live and outlives the buffer (Drop drops buffers first).
        let buf = unsafe { RegisteredBuf::new(self.rdma.verbs, self.pd.as_ptr(), len, access) }?;
        self.bufs.push(buf);
        Ok(self.bufs.len() - 1)
    }

    /// Largest send posted inline (0: none), as the provider granted it.
    pub fn max_inline(&self) -> usize {
        self.max_inline
    }

    /// A registered buffer by index (panics on an index `register` never returned).
    pub fn buf(&self, index: usize) -> &RegisteredBuf {
        &self.bufs[index]
    }

    /// Registers `len` zeroed bytes of GPU memory (on `stream`'s device) with `access`,
    /// through dma-buf or nvidia-peermem (see [`GpuRegisteredBuf`]); returns its index among
    /// the GPU buffers.
    pub fn register_gpu(
        &mut self,
        stream: &std::sync::Arc<crate::cuda::cu::CudaStream>,
        len: usize,
        access: u32,
    ) -> Result<usize, RdmaError> {
        // SAFETY: the PD is live and outlives the buffer (Drop drops buffers first).
        let buf = unsafe {
            GpuRegisteredBuf::new(self.rdma.verbs, self.pd.as_ptr(), stream, len, access)
        }?;
        self.gpu_bufs.push(buf);
        Ok(self.gpu_bufs.len() - 1)
    }

    /// A registered GPU buffer by index (panics on an index `register_gpu` never returned).
    pub fn gpu_buf(&self, index: usize) -> &GpuRegisteredBuf {
        &self.gpu_bufs[index]
    }

    pub fn handle(&self) -> usize {
        self.id.handle()
    }

    fn qp(&self) -> *mut crate::verbs::ibv_qp {
        // SAFETY: the id is live; qp was set by rdma_create_qp.
        unsafe { self.id.id.as_ref() }.qp
    }

    /// Posts one receive without buffers (for WRITE_WITH_IMM, which consumes a receive but
    /// writes its data where the sender says).
    pub fn post_recv_empty(&self, wr_id: u64) -> Result<(), RdmaError> {
        let mut wr = ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: ptr::null_mut(),
            num_sge: 0,
        };
        // SAFETY: the QP is live; the WR has no SGEs.
        unsafe { post_recv(self.qp(), &mut wr) }?;
        Ok(())
    }

    /// Posts a signaled RDMA WRITE_WITH_IMM of `len` bytes from buffer `buf` at `offset` to
    /// `remote_addr`/`rkey` with immediate `imm` (host order). The source range is bounds
    /// checked; the caller must leave it unchanged until the completion (else the peer gets
    /// whatever the bytes are when the NIC reads them).
    #[allow(clippy::too_many_arguments)]
    pub fn post_write_imm(
        &self,
        wr_id: u64,
        buf: usize,
        offset: usize,
        len: usize,
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    ) -> Result<(), RdmaError> {
        let b = self
            .bufs
            .get(buf)
            .ok_or_else(|| RdmaError::Other(format!("no registered buffer {buf}")))?;
        if !b.contains(offset, len) || len > u32::MAX as usize {
            return Err(RdmaError::Other(format!(
                "write of {len} bytes at {offset} is outside the {}-byte buffer",
                b.len()
            )));
        }
        let mut sge = ibv_sge {
            addr: b.addr() + offset as u64,
            length: len as u32,
            lkey: b.lkey(),
        };
        let flags = if len <= self.max_inline {
            IBV_SEND_SIGNALED | IBV_SEND_INLINE
        } else {
            IBV_SEND_SIGNALED
        };
        let mut wr =
            ibv_send_wr::rdma_write_with_imm(wr_id, &mut sge, 1, remote_addr, rkey, imm, flags);
        // SAFETY: the QP is live; sge names registered memory inside a buffer owned by this
        // endpoint, which outlives the QP (Drop destroys the QP first); an inline send copies
        // the bytes during the call.
        unsafe { post_send(self.qp(), &mut wr) }?;
        Ok(())
    }

    /// Polls the CQ into `wc`; returns how many completions were written.
    pub fn poll(&self, wc: &mut [ibv_wc]) -> Result<usize, RdmaError> {
        // SAFETY: the CQ is live; providers serialise concurrent pollers internally.
        Ok(unsafe { crate::verbs::poll_cq(self.cq.as_ptr(), wc) }?)
    }

    fn conn_param(private: &[u8]) -> rdma_conn_param {
        rdma_conn_param {
            private_data: private.as_ptr() as *const c_void,
            private_data_len: private.len().min(255) as u8,
            responder_resources: 1,
            initiator_depth: 1,
            flow_control: 0,
            retry_count: 7,
            rnr_retry_count: 7,
            ..Default::default()
        }
    }

    /// `rdma_accept` with private data (at most 196 bytes over IB CM).
    pub fn accept(&self, private: &[u8]) -> Result<(), RdmaError> {
        let mut p = Self::conn_param(private);
        // SAFETY: the id is live with a QP; p and private live during the call.
        CmError::check("rdma_accept", unsafe {
            (self.rdma.cm.rdma_accept)(self.id.id.as_ptr(), &mut p)
        })?;
        Ok(())
    }

    /// `rdma_connect` with private data (at most 56 bytes over IB CM).
    pub fn connect(&self, private: &[u8]) -> Result<(), RdmaError> {
        let mut p = Self::conn_param(private);
        // SAFETY: the id is live with a resolved route and a QP; p lives during the call.
        CmError::check("rdma_connect", unsafe {
            (self.rdma.cm.rdma_connect)(self.id.id.as_ptr(), &mut p)
        })?;
        Ok(())
    }

    /// `rdma_disconnect` (flushes outstanding work requests; the peer sees DISCONNECTED).
    pub fn disconnect(&self) -> Result<(), RdmaError> {
        // SAFETY: the id is live.
        CmError::check("rdma_disconnect", unsafe {
            (self.rdma.cm.rdma_disconnect)(self.id.id.as_ptr())
        })?;
        Ok(())
    }

    /// `rdma_reject` (before accept).
    pub fn reject(&self, private: &[u8]) -> Result<(), RdmaError> {
        self.id.reject(private)
    }

    pub fn wc_status_str(&self, status: u32) -> String {
        self.rdma.verbs.wc_status_str(status)
    }
}

impl Drop for RcEndpoint {
    fn drop(&mut self) {
        if self.has_qp {
            // SAFETY: the QP was created by rdma_create_qp on this id; destroyed once, first,
            // so no work request names the buffers, CQ or PD afterwards.
            unsafe { (self.rdma.cm.rdma_destroy_qp)(self.id.id.as_ptr()) };
        }
        // Deregister and free the buffers while the PD is still alive.
        self.bufs.clear();
        self.gpu_bufs.clear();
        // SAFETY: the CQ has no QP attached any more; destroyed once.
        unsafe { (self.rdma.verbs.ibv_destroy_cq)(self.cq.as_ptr()) };
        // SAFETY: no QP or MR remains on the PD; deallocated once.
        unsafe { (self.rdma.verbs.ibv_dealloc_pd)(self.pd.as_ptr()) };
        // The id itself is destroyed when the `id` field drops, after this.
    }
}

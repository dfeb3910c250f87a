//! One reliable-connected (RC) queue pair per connection over rdma_cm + verbs: the loaded
//! libraries ([`Rdma`]), the error every RDMA call below the transport returns
//! ([`RdmaError`]), and an [`RcEndpoint`] that owns a connection's PD, CQ, QP and registered
//! buffers and posts RDMA WRITE_WITH_IMM and zero-length receives.
//!
//! Teardown: [`RcEndpoint`] destroys, in this order: QP, memory regions, CQ, PD, then the id.

use std::ffi::{c_int, c_uint, c_void};
use std::ptr::{self, NonNull};

use thiserror::Error;

use std::sync::Arc;

use super::cm::CmId;
use super::mem::{DeviceRegisterError, GpuRegisteredBuf, PdShare, ProtectionDomain, RegisteredBuf};
use super::ring::{RingError, SgeRange, SlotRing, SlotToken};
use super::sys::cm::{rdma_conn_param, CmError, RdmaCm};
use super::sys::verbs::{
    ibv_comp_channel, ibv_cq, ibv_qp_init_attr, ibv_recv_wr, ibv_send_wr, ibv_sge, post_recv,
    post_send, req_notify_cq, Verbs, VerbsError, IBV_QPT_RC, IBV_SEND_INLINE, IBV_SEND_SIGNALED,
};
use super::verbs::{AccessFlags, WcStatus, WorkCompletion};
use crate::dl::DlError;

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
    /// A ring's geometry does not fit its buffer.
    #[error(transparent)]
    Ring(#[from] RingError),
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

/// Queue sizes of an endpoint.
#[derive(Debug, Clone, Copy)]
pub struct QpSizes {
    pub cq_entries: u32,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
}

/// One RC connection's verbs resources: PD, CQ (send and receive), QP, registered buffers
/// (each laid out as a [`SlotRing`]).
#[derive(Debug)]
pub struct RcEndpoint {
    rdma: Rdma,
    id: Arc<CmId>,
    pd: Arc<ProtectionDomain>,
    cq: NonNull<ibv_cq>,
    /// The CQ's completion channel (event mode: [`Self::arm`], [`Self::take_events`]), its
    /// fd non-blocking; None for a polled-only CQ.
    channel: Option<NonNull<ibv_comp_channel>>,
    has_qp: bool,
    rings: Vec<SlotRing<RegisteredBuf>>,
    gpu_bufs: Vec<GpuRegisteredBuf>,
    /// Largest send the QP takes inline (copied into the work request: the NIC does not read
    /// the buffer by DMA afterwards), as the provider granted it; 0 where it granted none.
    max_inline: usize,
}

/// Inline data asked for at QP creation: a 64-byte request and its echo reply (32-byte header
/// + 96-byte body + payload) fit, as in perftest's latency tests.
const WANT_INLINE: u32 = 256;

// SAFETY: libibverbs objects (PD, CQ, QP) are thread-safe: providers lock inside post_send,
// post_recv and poll_cq; the buffers' bytes are only reachable through ring tokens or unsafe
// accessors.
unsafe impl Send for RcEndpoint {}
// SAFETY: as above.
unsafe impl Sync for RcEndpoint {}

impl RcEndpoint {
    /// Allocates a PD and a CQ on the id's device and creates an RC QP on the id (state INIT;
    /// rdma_accept/rdma_connect take it to RTS).
    pub fn create(rdma: Rdma, id: CmId, sizes: QpSizes) -> Result<RcEndpoint, RdmaError> {
        Self::create_with(rdma, id, sizes, false)
    }

    /// [`Self::create`], with `events`: the CQ gets a completion channel of its own (its fd
    /// non-blocking), so that a waiter can sleep until a completion arrives instead of
    /// polling ([`Self::arm`], [`EventWait`], [`Self::take_events`]).
    pub fn create_with(
        rdma: Rdma,
        id: CmId,
        sizes: QpSizes,
        events: bool,
    ) -> Result<RcEndpoint, RdmaError> {
        Self::create_in(rdma, id, sizes, events, None)
    }

    /// [`Self::create_with`], with the PD taken from `share` (the one shared PD of the id's
    /// device) instead of a PD of its own: every endpoint so created on one device may post
    /// work requests naming the others' registered memory ([`Self::post_write_from`]).
    pub fn create_in(
        rdma: Rdma,
        id: CmId,
        sizes: QpSizes,
        events: bool,
        share: Option<&PdShare>,
    ) -> Result<RcEndpoint, RdmaError> {
        // SAFETY: the id is live.
        let ctx = unsafe { id.id.as_ref() }.verbs;
        if ctx.is_null() {
            return Err(RdmaError::Other(
                "the connection id has no device (address not resolved)".into(),
            ));
        }
        let id = Arc::new(id);
        let pd = match share {
            // SAFETY: ctx is the id's live device context.
            Some(share) => unsafe { share.get_or_alloc(rdma.verbs, ctx, &id) }?,
            // SAFETY: as above.
            None => unsafe { ProtectionDomain::alloc(rdma.verbs, ctx, id.clone()) }?,
        };
        let channel = if events {
            // SAFETY: ctx is the id's live device context.
            let ch = unsafe { (rdma.verbs.ibv_create_comp_channel)(ctx) };
            let Some(ch) = NonNull::new(ch) else {
                return Err(VerbsError::last("ibv_create_comp_channel").into());
            };
            // SAFETY: ch is live; its fd is an open descriptor owned by libibverbs.
            let fd = unsafe { ch.as_ref() }.fd;
            // SAFETY: fcntl on an open fd with integer arguments.
            let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            // SAFETY: as above.
            if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
                let e = VerbsError::last("fcntl(O_NONBLOCK) on the completion channel");
                // SAFETY: ch is live and has no CQ yet; destroyed once.
                unsafe { (rdma.verbs.ibv_destroy_comp_channel)(ch.as_ptr()) };
                return Err(e.into());
            }
            Some(ch)
        } else {
            None
        };
        let ch_ptr = channel.map_or(ptr::null_mut(), NonNull::as_ptr);
        // SAFETY: ctx is live; ch_ptr is null or a live channel on the same context.
        let cq = unsafe {
            (rdma.verbs.ibv_create_cq)(ctx, sizes.cq_entries as c_int, ptr::null_mut(), ch_ptr, 0)
        };
        let Some(cq) = NonNull::new(cq) else {
            let e = VerbsError::last("ibv_create_cq");
            if let Some(ch) = channel {
                // SAFETY: the channel has no CQ; destroyed once.
                unsafe { (rdma.verbs.ibv_destroy_comp_channel)(ch.as_ptr()) };
            }
            // The PD (no objects on it) is deallocated as its only Arc drops.
            return Err(e.into());
        };
        let mut ep = RcEndpoint {
            rdma,
            id,
            pd,
            cq,
            channel,
            has_qp: false,
            rings: Vec::new(),
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
        // Two: a GPU-resident reply gathers its host-side header and its device-side body.
        attr.cap.max_send_sge = 2;
        attr.cap.max_recv_sge = 1;
        attr.cap.max_inline_data = WANT_INLINE;
        // SAFETY: id, pd and cq are live and on the same device; attr is a valid init attr.
        let with_inline = CmError::check("rdma_create_qp", unsafe {
            (rdma.cm.rdma_create_qp)(ep.id.id.as_ptr(), ep.pd.as_ptr(), &mut attr)
        });
        if with_inline.is_err() {
            // A device with less (or no) inline space: plain sends.
            attr.cap.max_inline_data = 0;
            // SAFETY: as above; the failed call created no QP.
            CmError::check("rdma_create_qp", unsafe {
                (rdma.cm.rdma_create_qp)(ep.id.id.as_ptr(), ep.pd.as_ptr(), &mut attr)
            })?;
        }
        // The provider writes the capabilities it granted back into attr.cap.
        ep.max_inline = attr.cap.max_inline_data as usize;
        ep.has_qp = true;
        Ok(ep)
    }

    /// Registers a new zeroed buffer of `len` bytes with `access` (a ring of one `len`-byte
    /// slot); returns its index.
    pub fn register(&mut self, len: usize, access: AccessFlags) -> Result<usize, RdmaError> {
        self.register_ring(len, 1, access)
    }

    /// Registers a new zeroed buffer of `depth` slots of `slot_size` bytes with `access`, laid
    /// out as a [`SlotRing`]; returns its index (for [`Self::ring`], [`Self::buf`] and
    /// [`Self::post_write_imm`]).
    pub fn register_ring(
        &mut self,
        slot_size: usize,
        depth: u32,
        access: AccessFlags,
    ) -> Result<usize, RdmaError> {
        let len = slot_size
            .checked_mul(depth as usize)
            .ok_or(RingError::TooLarge { slot_size, depth })?;
        let buf = RegisteredBuf::new(&self.pd, len, access)?;
        self.rings.push(SlotRing::new(buf, slot_size, depth)?);
        Ok(self.rings.len() - 1)
    }

    /// A registered ring by index (panics on an index `register*` never returned). The
    /// handle is shared: clone it to claim slots from another thread.
    pub fn ring(&self, index: usize) -> &SlotRing<RegisteredBuf> {
        &self.rings[index]
    }

    /// Largest send posted inline (0: none), as the provider granted it.
    pub fn max_inline(&self) -> usize {
        self.max_inline
    }

    /// A registered buffer by index (panics on an index `register` never returned).
    pub fn buf(&self, index: usize) -> &RegisteredBuf {
        self.rings[index].memory()
    }

    /// Registers `len` zeroed bytes of GPU memory (on `stream`'s device) with `access`,
    /// through dma-buf or nvidia-peermem (see [`GpuRegisteredBuf`]); returns its index among
    /// the GPU buffers.
    pub fn register_gpu(
        &mut self,
        stream: &std::sync::Arc<crate::gpu::cuda::cu::CudaStream>,
        len: usize,
        access: AccessFlags,
    ) -> Result<usize, RdmaError> {
        let buf = GpuRegisteredBuf::new(&self.pd, stream, len, access)?;
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

    fn qp(&self) -> *mut super::sys::verbs::ibv_qp {
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
        let (mut sge, flags) = self.write_source(buf, offset, len)?;
        let mut wr =
            ibv_send_wr::rdma_write_with_imm(wr_id, &mut sge, 1, remote_addr, rkey, imm, flags);
        // SAFETY: the QP is live; sge names registered memory inside a buffer owned by this
        // endpoint, which outlives the QP (Drop destroys the QP first); an inline send copies
        // the bytes during the call.
        unsafe { post_send(self.qp(), &mut wr) }?;
        Ok(())
    }

    /// The scatter entry and send flags of a signaled WRITE of `len` bytes from buffer `buf`
    /// at `offset` (bounds checked; inline where it fits): what both WRITE kinds share.
    fn write_source(
        &self,
        buf: usize,
        offset: usize,
        len: usize,
    ) -> Result<(ibv_sge, c_uint), RdmaError> {
        let b = self
            .rings
            .get(buf)
            .map(SlotRing::memory)
            .ok_or_else(|| RdmaError::Other(format!("no registered buffer {buf}")))?;
        debug_assert!(b.is_on(&self.pd));
        if !b.contains(offset, len) || len > u32::MAX as usize {
            return Err(RdmaError::Other(format!(
                "write of {len} bytes at {offset} is outside the {}-byte buffer",
                b.len()
            )));
        }
        let sge = ibv_sge {
            addr: b.addr() + offset as u64,
            length: len as u32,
            lkey: b.lkey(),
        };
        let flags = if len <= self.max_inline {
            IBV_SEND_SIGNALED | IBV_SEND_INLINE
        } else {
            IBV_SEND_SIGNALED
        };
        Ok((sge, flags))
    }

    /// Posts a signaled plain RDMA WRITE (no immediate: the responder consumes no receive and
    /// writes no completion) of `len` bytes from buffer `buf` at `offset` to
    /// `remote_addr`/`rkey`, inline where it fits: the memory-polled fast path's one work
    /// request (docs/rdma.md, "Fast path"), whose last 4 bytes are the completion word the
    /// receiver polls. The source range is bounds checked and must stay unchanged until the
    /// completion.
    pub fn post_write(
        &self,
        wr_id: u64,
        buf: usize,
        offset: usize,
        len: usize,
        remote_addr: u64,
        rkey: u32,
    ) -> Result<(), RdmaError> {
        let (mut sge, flags) = self.write_source(buf, offset, len)?;
        let mut wr = ibv_send_wr::rdma_write(wr_id, &mut sge, 1, remote_addr, rkey, flags);
        // SAFETY: the QP is live; sge names registered memory inside a buffer owned by this
        // endpoint, which outlives the QP (Drop destroys the QP first); an inline send copies
        // the bytes during the call.
        unsafe { post_send(self.qp(), &mut wr) }?;
        Ok(())
    }

    /// Whether a work request on this endpoint may name `token`'s slot: its ring is
    /// registered in this endpoint's protection domain (a shared one, [`PdShare`]).
    pub fn can_post_from(&self, token: &SlotToken<RegisteredBuf>) -> bool {
        token.memory().is_on(&self.pd)
    }

    /// [`Self::can_post_from`] for a range already taken.
    pub fn can_post_range(&self, range: &SgeRange) -> bool {
        range.pd == Arc::as_ptr(&self.pd) as usize
    }

    /// Posts a signaled RDMA WRITE (`imm` None) or WRITE_WITH_IMM whose scatter list is one
    /// or two ranges of registered memory ([`SgeRange`], taken from ring slots with
    /// [`SlotToken::range`]) in this endpoint's PD, possibly another endpoint's rings
    /// (zero-copy forwarding: the bytes go from where they were received, never copied by
    /// the CPU, and never inline). The NIC gathers them in order into one contiguous write
    /// to `remote_addr`/`rkey`. Each range's PD is checked; the caller keeps the slots
    /// unchanged and registered (holds their tokens) until the completion. A range whose
    /// memory was deregistered meanwhile makes the work request fail with a protection
    /// error: the NIC never touches memory that is no longer registered.
    pub fn post_write_from(
        &self,
        wr_id: u64,
        parts: &[SgeRange],
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
    ) -> Result<(), RdmaError> {
        if parts.is_empty() || parts.len() > 2 {
            return Err(RdmaError::Other(format!(
                "a gathered write takes 1 or 2 ranges, not {}",
                parts.len()
            )));
        }
        let mut sges = [ibv_sge::default(); 2];
        let mut total = 0u64;
        for (sge, part) in sges.iter_mut().zip(parts) {
            if part.pd != Arc::as_ptr(&self.pd) as usize {
                return Err(RdmaError::Other(
                    "a gathered write names memory outside this endpoint's protection domain"
                        .into(),
                ));
            }
            *sge = ibv_sge {
                addr: part.addr,
                length: part.len,
                lkey: part.lkey,
            };
            total += part.len as u64;
        }
        if total > u32::MAX as u64 {
            return Err(RdmaError::Other(format!(
                "write of {total} bytes is too long"
            )));
        }
        let n = parts.len() as c_int;
        let mut wr = match imm {
            Some(imm) => ibv_send_wr::rdma_write_with_imm(
                wr_id,
                sges.as_mut_ptr(),
                n,
                remote_addr,
                rkey,
                imm,
                IBV_SEND_SIGNALED,
            ),
            None => ibv_send_wr::rdma_write(
                wr_id,
                sges.as_mut_ptr(),
                n,
                remote_addr,
                rkey,
                IBV_SEND_SIGNALED,
            ),
        };
        // SAFETY: the QP is live (created with two send SGEs); every SGE names memory
        // registered in this endpoint's PD (checked above), bounds checked against its slot
        // when the range was taken; the SGE array lives during the call (the provider copies
        // it). Memory deregistered before the NIC reads it fails the request, no more.
        unsafe { post_send(self.qp(), &mut wr) }?;
        Ok(())
    }

    /// Arms the CQ's completion channel for the next completion (`ibv_req_notify_cq`). A
    /// waiter arms, polls once more (a completion that arrived before the arm raises no
    /// event), and only then waits ([`EventWait`]). Fails on an endpoint without a channel.
    pub fn arm(&self) -> Result<(), RdmaError> {
        if self.channel.is_none() {
            return Err(RdmaError::Other(
                "arming a CQ that has no completion channel".into(),
            ));
        }
        // SAFETY: the CQ is live and was created with a completion channel.
        unsafe { req_notify_cq(self.cq.as_ptr(), false) }?;
        Ok(())
    }

    /// The completion channel's fd, for [`EventWait`]; None without a channel.
    pub fn event_fd(&self) -> Option<c_int> {
        // SAFETY: the channel is live until Drop; its fd never changes.
        self.channel.map(|ch| unsafe { ch.as_ref() }.fd)
    }

    /// Takes every completion event waiting on the channel (`ibv_get_cq_event`, without
    /// blocking: the fd is non-blocking) and acknowledges them (`ibv_ack_cq_events`); returns
    /// how many. The CQ stays unarmed until the next [`Self::arm`].
    pub fn take_events(&self) -> Result<u32, RdmaError> {
        let Some(ch) = self.channel else {
            return Ok(0);
        };
        let mut n = 0u32;
        loop {
            let mut cq: *mut ibv_cq = ptr::null_mut();
            let mut ctx: *mut c_void = ptr::null_mut();
            // SAFETY: the channel is live; cq and ctx are writable out-pointers; the fd is
            // non-blocking, so this returns -1 (EAGAIN) when no event waits.
            let rc = unsafe { (self.rdma.verbs.ibv_get_cq_event)(ch.as_ptr(), &mut cq, &mut ctx) };
            if rc != 0 {
                // Read errno before anything else can change it (no allocation on EAGAIN).
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                if errno == libc::EAGAIN || errno == libc::EWOULDBLOCK || errno == libc::EINTR {
                    break;
                }
                return Err(VerbsError::from_errno("ibv_get_cq_event", errno).into());
            }
            n += 1;
            // Only this endpoint's CQ uses the channel, so `cq` is ours.
            // SAFETY: cq is the CQ the event was returned for (this endpoint's, live); one
            // event is acknowledged per event taken, before the CQ is destroyed.
            unsafe { (self.rdma.verbs.ibv_ack_cq_events)(cq, 1) };
        }
        Ok(n)
    }

    /// Posts a signaled RDMA WRITE_WITH_IMM that gathers `host_len` bytes of host buffer
    /// `host_buf` at `host_off` and then `gpu_len` bytes of GPU buffer `gpu_buf` at `gpu_off`
    /// (GPUDirect: the NIC reads the second part from device memory) into one contiguous
    /// write to `remote_addr`/`rkey` with immediate `imm`. Both ranges are bounds checked; the
    /// caller leaves them unchanged until the completion.
    #[allow(clippy::too_many_arguments)]
    pub fn post_write_imm_gathered(
        &self,
        wr_id: u64,
        (host_buf, host_off, host_len): (usize, usize, usize),
        (gpu_buf, gpu_off, gpu_len): (usize, usize, usize),
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    ) -> Result<(), RdmaError> {
        let h = self
            .rings
            .get(host_buf)
            .map(SlotRing::memory)
            .ok_or_else(|| RdmaError::Other(format!("no registered buffer {host_buf}")))?;
        let g = self
            .gpu_bufs
            .get(gpu_buf)
            .ok_or_else(|| RdmaError::Other(format!("no registered GPU buffer {gpu_buf}")))?;
        let gpu_in = gpu_off
            .checked_add(gpu_len)
            .is_some_and(|end| end <= g.len());
        if !h.contains(host_off, host_len) || !gpu_in || host_len + gpu_len > u32::MAX as usize {
            return Err(RdmaError::Other(format!(
                "gathered write of {host_len} B at {host_off} (of {}) + {gpu_len} B at {gpu_off} (of {}) is out of bounds",
                h.len(),
                g.len()
            )));
        }
        let mut sges = [
            ibv_sge {
                addr: h.addr() + host_off as u64,
                length: host_len as u32,
                lkey: h.lkey(),
            },
            ibv_sge {
                addr: g.addr() + gpu_off as u64,
                length: gpu_len as u32,
                lkey: g.lkey(),
            },
        ];
        let n = if gpu_len == 0 { 1 } else { 2 };
        let mut wr = ibv_send_wr::rdma_write_with_imm(
            wr_id,
            sges.as_mut_ptr(),
            n,
            remote_addr,
            rkey,
            imm,
            IBV_SEND_SIGNALED,
        );
        // SAFETY: the QP is live (created with two send SGEs); both SGEs name registered
        // memory inside buffers owned by this endpoint, which outlive the QP (Drop destroys the
        // QP first); the SGE array lives during the call (the provider copies it).
        unsafe { post_send(self.qp(), &mut wr) }?;
        Ok(())
    }

    /// Polls the CQ into `wc`; returns how many completions were written.
    pub fn poll(&self, wc: &mut [WorkCompletion]) -> Result<usize, RdmaError> {
        let raw = WorkCompletion::as_raw_slice_mut(wc);
        // SAFETY: the CQ is live; providers serialise concurrent pollers internally.
        Ok(unsafe { super::sys::verbs::poll_cq(self.cq.as_ptr(), raw) }?)
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

    /// libibverbs' text for a completion status (`ibv_wc_status_str`).
    pub fn wc_status_str(&self, status: WcStatus) -> String {
        self.rdma.verbs.wc_status_str(status.raw())
    }
}

impl Drop for RcEndpoint {
    fn drop(&mut self) {
        if self.has_qp {
            // SAFETY: the QP was created by rdma_create_qp on this id; destroyed once, first,
            // so no work request names the buffers, CQ or PD afterwards.
            unsafe { (self.rdma.cm.rdma_destroy_qp)(self.id.id.as_ptr()) };
        }
        // Deregister and free the buffers (a ring handle or token held elsewhere keeps its
        // buffer, and with it the PD and the id, until it drops).
        self.rings.clear();
        self.gpu_bufs.clear();
        // Events taken were acknowledged as they were taken (`take_events`), as
        // ibv_destroy_cq requires; take the rest.
        let _ = self.take_events();
        // SAFETY: the CQ has no QP attached any more; destroyed once.
        unsafe { (self.rdma.verbs.ibv_destroy_cq)(self.cq.as_ptr()) };
        if let Some(ch) = self.channel {
            // SAFETY: its only CQ is destroyed; destroyed once.
            unsafe { (self.rdma.verbs.ibv_destroy_comp_channel)(ch.as_ptr()) };
        }
        // The PD is deallocated as the last Arc to it drops (the `pd` field, after this, unless
        // a buffer is still out), and the id after the PD (the PD holds it).
    }
}

/// Waits on the completion channels of several endpoints at once (`poll(2)` on their fds):
/// the event-mode receive loop of rdma_server, which serves many connections. The fd list is
/// preallocated and reused between waits.
#[derive(Debug, Default)]
pub struct EventWait {
    fds: Vec<libc::pollfd>,
}

impl EventWait {
    /// Room for `n` endpoints without reallocating.
    pub fn with_capacity(n: usize) -> Self {
        EventWait {
            fds: Vec::with_capacity(n),
        }
    }

    /// Forgets the endpoints of the last wait.
    pub fn clear(&mut self) {
        self.fds.clear();
    }

    /// Adds `ep`'s completion channel (nothing for an endpoint without one).
    pub fn add(&mut self, ep: &RcEndpoint) {
        if let Some(fd) = ep.event_fd() {
            self.fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
    }

    /// Sleeps until a completion event is readable on one of the channels added, or
    /// `timeout_ms` passes (0 = just look); returns how many channels have events (0 on
    /// timeout or a signal).
    pub fn wait(&mut self, timeout_ms: i32) -> Result<usize, RdmaError> {
        if self.fds.is_empty() {
            if timeout_ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(timeout_ms as u64));
            }
            return Ok(0);
        }
        // SAFETY: fds is a live array of fds.len() pollfds; the fds are owned by live
        // channels (the caller's endpoints outlive the call).
        let rc = unsafe {
            libc::poll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if rc < 0 {
            let e = VerbsError::last("poll on completion channels");
            if e.errno() == Some(libc::EINTR) {
                return Ok(0);
            }
            return Err(e.into());
        }
        Ok(rc as usize)
    }
}

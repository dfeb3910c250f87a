//! Registered memory for the RDMA transport: the protection domain every region of a
//! connection is registered on ([`ProtectionDomain`], shared), page-aligned zeroed host
//! buffers ([`RegisteredBuf`]) and GPU buffers ([`GpuRegisteredBuf`]).
//!
//! A buffer holds its protection domain (and through it the connection's rdma_cm id, hence
//! the device context), so a buffer that outlives its [`super::conn::RcEndpoint`] (e.g. a
//! [`super::ring::SlotRing`] a worker still holds) is still deregistered on a live PD.
//!
//! The NIC reads and writes these bytes outside the Rust abstract machine, so the accessors
//! that lend them as slices are `unsafe`: the caller states which protocol rule keeps the peer
//! (and other threads) away from the range while the slice lives. The safe way in is
//! [`super::ring::SlotRing`], whose tokens make that rule an atomic flag.

use std::alloc::{self, Layout};
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use super::cm::CmId;
use super::sys::verbs::{ibv_context, ibv_mr, ibv_pd, Verbs, VerbsError};
use super::verbs::AccessFlags;
use crate::gpu::cuda::{cu, CudaError};
use crate::gpu::host_register::HostRegistration;

/// Alignment of every registered buffer (a page: NICs and rxe work per page).
pub const BUF_ALIGN: usize = 4096;

/// A protection domain on an rdma_cm id's device, deallocated when the endpoint and the last
/// buffer registered on it are gone; it keeps the id (and so the device context) alive until
/// then.
#[derive(Debug)]
pub struct ProtectionDomain {
    verbs: &'static Verbs,
    pd: NonNull<ibv_pd>,
    /// The device context it was allocated on (rdma_cm keeps one per device).
    ctx: NonNull<ibv_context>,
    _id: Arc<CmId>,
}

// SAFETY: a PD is a libibverbs object usable from any thread (verbs calls are thread-safe);
// the handle is only read, and deallocated once in Drop.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    /// `ibv_alloc_pd` on `ctx`, the device context of `id`.
    ///
    /// # Safety
    /// `ctx` must be `id`'s live device context (`rdma_cm_id::verbs`).
    pub(crate) unsafe fn alloc(
        verbs: &'static Verbs,
        ctx: *mut ibv_context,
        id: Arc<CmId>,
    ) -> Result<Arc<ProtectionDomain>, VerbsError> {
        // SAFETY: ctx is the id's live device context (caller); the id is kept alive by the PD.
        let pd = NonNull::new(unsafe { (verbs.ibv_alloc_pd)(ctx) })
            .ok_or_else(|| VerbsError::last("ibv_alloc_pd"))?;
        let ctx = NonNull::new(ctx)
            .ok_or_else(|| VerbsError::from_errno("ibv_alloc_pd", libc::EINVAL))?;
        Ok(Arc::new(ProtectionDomain {
            verbs,
            pd,
            ctx,
            _id: id,
        }))
    }

    pub(crate) fn as_ptr(&self) -> *mut ibv_pd {
        self.pd.as_ptr()
    }
}

/// One protection domain per device, shared by every endpoint created with it
/// ([`super::conn::RcEndpoint::create_in`]): a proxy's inbound connections and its backend
/// connections then register their rings in the same PD, so a work request on one QP may
/// name memory registered for another (zero-copy forwarding, docs/rdma.md). Endpoints on
/// another device get that device's own shared PD. Used only at connection set-up.
#[derive(Debug, Default)]
pub struct PdShare {
    pds: Mutex<Vec<Arc<ProtectionDomain>>>,
}

impl PdShare {
    pub fn new() -> Arc<PdShare> {
        Arc::new(PdShare::default())
    }

    /// The shared PD of device context `ctx`, allocated on first use (it then keeps `id`,
    /// and so the context, alive for as long as the share or an endpoint holds it).
    ///
    /// # Safety
    /// `ctx` must be `id`'s live device context (`rdma_cm_id::verbs`).
    pub(crate) unsafe fn get_or_alloc(
        &self,
        verbs: &'static Verbs,
        ctx: *mut ibv_context,
        id: &Arc<CmId>,
    ) -> Result<Arc<ProtectionDomain>, VerbsError> {
        // A poisoned lock only means another set-up panicked; the list is still whole.
        let mut pds = self.pds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pd) = pds.iter().find(|pd| pd.ctx.as_ptr() == ctx) {
            return Ok(pd.clone());
        }
        // SAFETY: ctx is id's live device context (caller).
        let pd = unsafe { ProtectionDomain::alloc(verbs, ctx, id.clone()) }?;
        pds.push(pd.clone());
        Ok(pd)
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: every QP on the PD was destroyed by its endpoint and every MR holds an Arc to
        // the PD (so none is left); deallocated once. The id drops after this.
        unsafe { (self.verbs.ibv_dealloc_pd)(self.pd.as_ptr()) };
    }
}

/// A zeroed, page-aligned allocation registered as one memory region.
#[derive(Debug)]
pub struct RegisteredBuf {
    pd: Arc<ProtectionDomain>,
    ptr: NonNull<u8>,
    layout: Layout,
    mr: NonNull<ibv_mr>,
}

// SAFETY: the buffer is plain memory owned by this value and the MR handle is a libibverbs
// object usable from any thread (libibverbs verbs are thread-safe); access to the bytes goes
// through the unsafe accessors whose callers guarantee exclusivity per range.
unsafe impl Send for RegisteredBuf {}
// SAFETY: as above; &self methods only read the immutable handle fields.
unsafe impl Sync for RegisteredBuf {}

impl RegisteredBuf {
    /// Allocates `len` zeroed bytes (page-aligned, `len` > 0) and registers them on `pd` with
    /// `access`; the buffer keeps `pd` alive.
    pub(crate) fn new(
        pd: &Arc<ProtectionDomain>,
        len: usize,
        access: AccessFlags,
    ) -> Result<RegisteredBuf, VerbsError> {
        let verbs = pd.verbs;
        let layout = Layout::from_size_align(len.max(1), BUF_ALIGN)
            .map_err(|_| VerbsError::from_errno("alloc", libc::EINVAL))?;
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            return Err(VerbsError::from_errno("alloc", libc::ENOMEM));
        };
        // SAFETY: pd is live (we hold an Arc to it); ptr..ptr+len is our allocation, kept
        // until after ibv_dereg_mr in Drop.
        let mr =
            unsafe { verbs.reg_mr(pd.as_ptr(), ptr.as_ptr() as *mut c_void, len, access.bits()) };
        match mr {
            Ok(mr) => Ok(RegisteredBuf {
                pd: pd.clone(),
                ptr,
                layout,
                mr,
            }),
            Err(e) => {
                // SAFETY: allocated above with this layout, not registered, freed once.
                unsafe { alloc::dealloc(ptr.as_ptr(), layout) };
                Err(e)
            }
        }
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        self.layout.size() == 0
    }

    /// The virtual address the peer uses (iova = addr).
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: mr is live until Drop; lkey is never changed after registration.
        unsafe { self.mr.as_ref().lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: as for lkey.
        unsafe { self.mr.as_ref().rkey }
    }

    fn check(&self, offset: usize, len: usize) -> Option<()> {
        (offset.checked_add(len)? <= self.len()).then_some(())
    }

    /// Lends `offset..offset+len` for reading; `None` when out of bounds.
    ///
    /// # Safety
    /// Nothing may write the range while the slice lives: no other thread, and no NIC (the
    /// protocol must keep the peer from writing it, e.g. a ring slot it holds no credit for).
    pub unsafe fn slice(&self, offset: usize, len: usize) -> Option<&[u8]> {
        self.check(offset, len)?;
        // SAFETY: in bounds of our live allocation; the caller excludes writers.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) })
    }

    /// Lends `offset..offset+len` for writing; `None` when out of bounds.
    ///
    /// # Safety
    /// Nothing else may read or write the range while the slice lives (other threads, the NIC
    /// sending from it, the peer writing into it).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: usize, len: usize) -> Option<&mut [u8]> {
        self.check(offset, len)?;
        // SAFETY: in bounds of our live allocation; the caller guarantees exclusivity.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) })
    }

    /// Whether `offset..offset+len` lies inside the buffer.
    pub fn contains(&self, offset: usize, len: usize) -> bool {
        self.check(offset, len).is_some()
    }

    /// The address of the PD it is registered in (for comparisons only).
    pub(crate) fn pd_addr(&self) -> usize {
        Arc::as_ptr(&self.pd) as usize
    }

    /// Whether the buffer was registered on `pd`.
    pub fn is_on(&self, pd: &Arc<ProtectionDomain>) -> bool {
        Arc::ptr_eq(&self.pd, pd)
    }
}

// SAFETY: ptr..ptr+len is our live allocation at a fixed address until Drop, valid for reads
// and writes; nothing safe outside a ring reaches its bytes (slice/slice_mut are unsafe).
unsafe impl super::ring::RingMemory for RegisteredBuf {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for RegisteredBuf {
    fn drop(&mut self) {
        // SAFETY: mr came from ibv_reg_mr on self.pd (still alive: we hold it) and is
        // deregistered exactly once; a work request still naming this memory fails with a
        // protection error after this, the NIC never touches the freed pages.
        let rc = unsafe { (self.pd.verbs.ibv_dereg_mr)(self.mr.as_ptr()) };
        if rc != 0 {
            // Deregistration failed: the NIC may still map the pages; leak them rather than
            // free memory the device could write.
            return;
        }
        // SAFETY: allocated in new with this layout; freed exactly once, after dereg.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Plain zeroed host memory, not registered with the NIC: no peer can reach it. The server
/// copies each request out of its remote-writable landing ring into one of these before
/// reading it. Page-aligned and a whole number of pages, so it can be registered with CUDA
/// ([`HostBuf::register_with_cuda`]) without sharing a page with other memory.
#[derive(Debug)]
pub struct HostBuf {
    ptr: NonNull<u8>,
    layout: Layout,
    len: usize,
    /// Registered with CUDA (GPU uploads read it in place) until drop.
    cuda: Option<HostRegistration>,
}

// SAFETY: plain memory owned by this value; its bytes are reached only through a ring.
unsafe impl Send for HostBuf {}
// SAFETY: as above; &self methods only read the immutable fields.
unsafe impl Sync for HostBuf {}

impl HostBuf {
    /// `len` zeroed bytes, page-aligned (the allocation rounded up to whole pages); None
    /// when the allocation fails.
    pub fn new(len: usize) -> Option<HostBuf> {
        let size = len.max(1).checked_next_multiple_of(PAGE)?;
        let layout = Layout::from_size_align(size, PAGE).ok()?;
        // SAFETY: layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })?;
        Some(HostBuf {
            ptr,
            layout,
            len: len.max(1),
            cuda: None,
        })
    }

    /// Registers the whole buffer with CUDA (`cuMemHostRegister`, portable), once: GPU
    /// uploads from it are then DMA straight from these bytes. On error the buffer stays
    /// plain pageable memory (uploads still work, staged by the driver).
    pub fn register_with_cuda(&mut self, ctx: &Arc<cu::CudaContext>) -> Result<(), CudaError> {
        if self.cuda.is_none() {
            // SAFETY: our own live allocation of layout.size() bytes at a fixed address; the
            // registration is dropped in Drop before the memory is freed.
            let reg = unsafe { HostRegistration::new(ctx, self.ptr, self.layout.size()) }?;
            self.cuda = Some(reg);
        }
        Ok(())
    }

    /// Whether [`Self::register_with_cuda`] succeeded.
    pub fn cuda_registered(&self) -> bool {
        self.cuda.is_some()
    }
}

/// Host pages, the unit of CUDA host registration.
const PAGE: usize = 4096;

impl Drop for HostBuf {
    fn drop(&mut self) {
        // Unregistered before the pages go back.
        self.cuda = None;
        // SAFETY: allocated in new with this layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

// SAFETY: our live allocation of layout.size() bytes at a fixed address until Drop; no
// accessor outside the ring lends its bytes.
unsafe impl super::ring::RingMemory for HostBuf {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// How device memory was registered with the NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRegistration {
    /// `ibv_reg_dmabuf_mr` on a dma-buf exported by the CUDA driver (no extra module).
    DmaBuf,
    /// `ibv_reg_mr` on the device pointer, which the nvidia_peermem module makes work.
    PeerMem,
}

/// Why GPU memory could not be registered: every route, with its own reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceRegisterError {
    #[error("allocating {len} B of GPU memory: {reason}")]
    Alloc { len: usize, reason: String },
    #[error(
        "GPU memory cannot be registered with this RDMA device: dma-buf route: {dmabuf}; \
         nvidia-peermem route: {peermem} (GPUDirect RDMA needs a NIC driver with dma-buf \
         support, kernel >= 5.12 and rdma-core >= 34, or the nvidia_peermem module loaded)"
    )]
    NoRoute { dmabuf: String, peermem: String },
}

/// Registers `addr..addr+len` of device memory on `pd`: first as the dma-buf `dmabuf` (when
/// the driver could export one; `Err` carries why not), then with plain `ibv_reg_mr` on the
/// device address (works where nvidia_peermem is loaded). The iova is the device address in
/// both routes, so the peer writes at the same addresses either way.
///
/// # Safety
/// `pd` must be a live protection domain; `addr..addr+len` must be device memory (or, for
/// the fallback, memory the kernel can pin) that stays allocated until the returned region
/// is deregistered.
pub unsafe fn register_device_memory(
    verbs: &'static Verbs,
    pd: *mut ibv_pd,
    addr: u64,
    len: usize,
    dmabuf: Result<std::os::fd::BorrowedFd<'_>, String>,
    access: u32,
) -> Result<(NonNull<ibv_mr>, DeviceRegistration), DeviceRegisterError> {
    use std::os::fd::AsRawFd;
    let dmabuf_reason = match dmabuf {
        // SAFETY: the caller's contract for pd and the range; the fd is borrowed for the
        // call only (the MR keeps its own reference to the dma-buf).
        Ok(fd) => match unsafe { verbs.reg_dmabuf_mr(pd, 0, len, addr, fd.as_raw_fd(), access) } {
            Ok(mr) => return Ok((mr, DeviceRegistration::DmaBuf)),
            Err(e) => e.to_string(),
        },
        Err(why) => why,
    };
    // SAFETY: the caller's contract for pd and the range.
    match unsafe { verbs.reg_mr(pd, addr as *mut c_void, len, access) } {
        Ok(mr) => Ok((mr, DeviceRegistration::PeerMem)),
        Err(e) => Err(DeviceRegisterError::NoRoute {
            dmabuf: dmabuf_reason,
            peermem: e.to_string(),
        }),
    }
}

/// GPU memory registered as one memory region: the target of GPUDirect RDMA writes.
pub struct GpuRegisteredBuf {
    pd: Arc<ProtectionDomain>,
    stream: std::sync::Arc<cu::CudaStream>,
    /// Freed in Drop only after a successful deregistration.
    mem: std::mem::ManuallyDrop<cu::CudaSlice<u8>>,
    addr: u64,
    mr: NonNull<ibv_mr>,
    route: DeviceRegistration,
}

// SAFETY: the MR handle is a thread-safe libibverbs object; the device memory is only read
// through the CUDA driver (copy_to_host), which is thread-safe; nothing hands out host
// references into it.
unsafe impl Send for GpuRegisteredBuf {}
// SAFETY: as above; &self methods read immutable fields or go through the driver.
unsafe impl Sync for GpuRegisteredBuf {}

impl std::fmt::Debug for GpuRegisteredBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuRegisteredBuf")
            .field("addr", &self.addr)
            .field("len", &self.mem.len())
            .field("route", &self.route)
            .finish()
    }
}

impl GpuRegisteredBuf {
    /// Allocates `len` zeroed bytes of device memory on `stream`'s GPU (rounded up to 64 KiB,
    /// the GPU page that both routes pin) and registers them on `pd` with `access`.
    ///
    /// The buffer keeps `pd` alive.
    pub(crate) fn new(
        pd: &Arc<ProtectionDomain>,
        stream: &std::sync::Arc<cu::CudaStream>,
        len: usize,
        access: AccessFlags,
    ) -> Result<GpuRegisteredBuf, DeviceRegisterError> {
        use cu::DevicePtr;
        const GPU_PAGE: usize = 64 << 10;
        let len = len.max(1).div_ceil(GPU_PAGE) * GPU_PAGE;
        let alloc_err = |e: cu::DriverError| DeviceRegisterError::Alloc {
            len,
            reason: e.to_string(),
        };
        stream.context().bind_to_thread().map_err(alloc_err)?;
        let mem = stream.alloc_zeros::<u8>(len).map_err(alloc_err)?;
        stream.synchronize().map_err(alloc_err)?;
        let addr = {
            let (ptr, _sync) = mem.device_ptr(stream);
            ptr
        };
        let fd = crate::gpu::cuda::export_dmabuf(stream, &mem);
        let borrowed = match &fd {
            Ok(fd) => Ok(std::os::fd::AsFd::as_fd(fd)),
            Err(e) => Err(format!("dma-buf export: {e}")),
        };
        // SAFETY: pd is live (we hold an Arc to it); mem is our device allocation, kept until
        // after ibv_dereg_mr in Drop.
        let (mr, route) = unsafe {
            register_device_memory(pd.verbs, pd.as_ptr(), addr, len, borrowed, access.bits())
        }?;
        Ok(GpuRegisteredBuf {
            pd: pd.clone(),
            stream: stream.clone(),
            mem: std::mem::ManuallyDrop::new(mem),
            addr,
            mr,
            route,
        })
    }

    pub fn len(&self) -> usize {
        self.mem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mem.len() == 0
    }

    /// The device address the peer writes to (iova = device address).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: mr is live until Drop; rkey never changes after registration.
        unsafe { self.mr.as_ref().rkey }
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: mr is live until Drop; lkey never changes after registration.
        unsafe { self.mr.as_ref().lkey }
    }

    pub fn route(&self) -> DeviceRegistration {
        self.route
    }

    /// `offset..offset+len` of the buffer, for kernels to read or write where it lies.
    pub fn span(&self, offset: usize, len: usize) -> Option<crate::gpu::resident::DeviceSpan<'_>> {
        crate::gpu::resident::DeviceSpan::within(self.addr, self.mem.len(), offset, len)
    }

    /// The stream the buffer was allocated on (copies of its slots run there).
    pub fn stream(&self) -> &std::sync::Arc<cu::CudaStream> {
        &self.stream
    }

    /// Copies `offset..offset+dst.len()` of the device memory into `dst` and waits; false
    /// when the range is out of bounds or the copy fails. Bytes the NIC is writing meanwhile
    /// come out garbled, not unsound: callers copy only slots the protocol gives them.
    pub fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<(), String> {
        let end = offset
            .checked_add(dst.len())
            .filter(|&e| e <= self.mem.len())
            .ok_or_else(|| format!("range {offset}+{} outside {} B", dst.len(), self.len()))?;
        let view = self.mem.slice(offset..end);
        self.stream
            .memcpy_dtoh(&view, dst)
            .and_then(|_| self.stream.synchronize())
            .map_err(|e| format!("copy from GPU memory: {e}"))?;
        crate::gpu::transfer::count_d2h(crate::gpu::transfer::Mover::Server, dst.len());
        Ok(())
    }
}

impl Drop for GpuRegisteredBuf {
    fn drop(&mut self) {
        // SAFETY: mr came from registration on self.pd (alive: we hold it) and is
        // deregistered exactly once; the owner destroys the QP first.
        let rc = unsafe { (self.pd.verbs.ibv_dereg_mr)(self.mr.as_ptr()) };
        if rc == 0 {
            // SAFETY: dropped exactly once, here, after the NIC let go of the pages.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.mem) };
        }
        // Deregistration failed: the NIC may still map the pages; leak them rather than
        // free memory the device could write.
    }
}

//! Registered memory for the RDMA transport: page-aligned, zeroed buffers allocated once and
//! registered with a protection domain ([`RegisteredBuf`]), owned by the connection
//! ([`crate::rdma_conn::RcEndpoint`]) whose PD registered them.
//!
//! The NIC reads and writes these bytes outside the Rust abstract machine, so the accessors
//! that lend them as slices are `unsafe`: the caller states which protocol rule keeps the peer
//! (and other threads) away from the range while the slice lives.

use std::alloc::{self, Layout};
use std::ffi::c_void;
use std::ptr::NonNull;

use crate::cuda::cu;
use crate::verbs::{ibv_mr, ibv_pd, Verbs, VerbsError};

/// Alignment of every registered buffer (a page: NICs and rxe work per page).
pub const BUF_ALIGN: usize = 4096;

/// A zeroed, page-aligned allocation registered as one memory region.
#[derive(Debug)]
pub struct RegisteredBuf {
    verbs: &'static Verbs,
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
    /// `access` (`IBV_ACCESS_*`).
    ///
    /// # Safety
    /// `pd` must be a live protection domain that outlives the returned buffer.
    pub(crate) unsafe fn new(
        verbs: &'static Verbs,
        pd: *mut ibv_pd,
        len: usize,
        access: u32,
    ) -> Result<RegisteredBuf, VerbsError> {
        let layout = Layout::from_size_align(len.max(1), BUF_ALIGN)
            .map_err(|_| VerbsError::from_errno("alloc", libc::EINVAL))?;
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            return Err(VerbsError::from_errno("alloc", libc::ENOMEM));
        };
        // SAFETY: pd is live (caller); ptr..ptr+len is our allocation, kept until after
        // ibv_dereg_mr in Drop.
        let mr = unsafe { verbs.reg_mr(pd, ptr.as_ptr() as *mut c_void, len, access) };
        match mr {
            Ok(mr) => Ok(RegisteredBuf {
                verbs,
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
}

impl Drop for RegisteredBuf {
    fn drop(&mut self) {
        // SAFETY: mr came from ibv_reg_mr and is deregistered exactly once; the owner
        // (RcEndpoint) destroys the QP first, so no work request still names this memory.
        let rc = unsafe { (self.verbs.ibv_dereg_mr)(self.mr.as_ptr()) };
        if rc != 0 {
            // Deregistration failed: the NIC may still map the pages; leak them rather than
            // free memory the device could write.
            return;
        }
        // SAFETY: allocated in new with this layout; freed exactly once, after dereg.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
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
    verbs: &'static Verbs,
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
    /// # Safety
    /// `pd` must be a live protection domain that outlives the returned buffer.
    pub(crate) unsafe fn new(
        verbs: &'static Verbs,
        pd: *mut ibv_pd,
        stream: &std::sync::Arc<cu::CudaStream>,
        len: usize,
        access: u32,
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
        let fd = crate::cuda::export_dmabuf(stream, &mem);
        let borrowed = match &fd {
            Ok(fd) => Ok(std::os::fd::AsFd::as_fd(fd)),
            Err(e) => Err(format!("dma-buf export: {e}")),
        };
        // SAFETY: pd is live (caller); mem is our device allocation, kept until after
        // ibv_dereg_mr in Drop.
        let (mr, route) =
            unsafe { register_device_memory(verbs, pd, addr, len, borrowed, access) }?;
        Ok(GpuRegisteredBuf {
            verbs,
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

    pub fn route(&self) -> DeviceRegistration {
        self.route
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
            .map_err(|e| format!("copy from GPU memory: {e}"))
    }
}

impl Drop for GpuRegisteredBuf {
    fn drop(&mut self) {
        // SAFETY: mr came from registration and is deregistered exactly once; the owner
        // destroys the QP first.
        let rc = unsafe { (self.verbs.ibv_dereg_mr)(self.mr.as_ptr()) };
        if rc == 0 {
            // SAFETY: dropped exactly once, here, after the NIC let go of the pages.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.mem) };
        }
        // Deregistration failed: the NIC may still map the pages; leak them rather than
        // free memory the device could write.
    }
}

//! Host memory registered with CUDA (`cuMemHostRegister`, portable: every context sees it
//! as page-locked), so an upload reads request bytes where they lie by DMA, with no staging
//! copy through the driver's own pinned buffers. Registration pins the pages (a system call
//! and page-table work): it is done once per buffer that lives long (a connection's request
//! copy ring), never per request. Where it fails (no driver, a locked-memory limit, memory
//! the driver refuses) the caller keeps the plain pageable path: uploads still work, staged
//! by the driver. What was registered, and what failed, is counted process-wide.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::cuda::{cu, CudaError};

static REGISTERED: AtomicU64 = AtomicU64::new(0);
static REGISTERED_BYTES: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicU64 = AtomicU64::new(0);

/// Process-wide counts of host registrations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostRegisterCounts {
    /// Registrations made so far, and their bytes.
    pub registered: u64,
    pub bytes: u64,
    /// Registrations refused by the driver (the caller fell back to pageable uploads).
    pub failed: u64,
    /// Registrations alive now.
    pub live: u64,
}

/// The counts now.
pub fn counts() -> HostRegisterCounts {
    HostRegisterCounts {
        registered: REGISTERED.load(Ordering::Relaxed),
        bytes: REGISTERED_BYTES.load(Ordering::Relaxed),
        failed: FAILED.load(Ordering::Relaxed),
        live: LIVE.load(Ordering::Relaxed),
    }
}

/// A range of host memory registered with CUDA until this value is dropped.
#[derive(Debug)]
pub struct HostRegistration {
    ctx: Arc<cu::CudaContext>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the value only holds the address to unregister it; cuMemHostUnregister may be
// called from any thread once the context is bound there (Drop binds it).
unsafe impl Send for HostRegistration {}
// SAFETY: &self methods only read the immutable fields.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// Registers `ptr..ptr+len` with CUDA (portable).
    ///
    /// # Safety
    /// The range must be host memory of this process that stays allocated, at the same
    /// address, until the returned value is dropped (drop it before freeing the memory).
    pub unsafe fn new(
        ctx: &Arc<cu::CudaContext>,
        ptr: NonNull<u8>,
        len: usize,
    ) -> Result<HostRegistration, CudaError> {
        let done = (|| {
            ctx.bind_to_thread()?;
            // SAFETY: the caller's contract: live host memory of `len` bytes at `ptr` that
            // outlives the registration.
            unsafe {
                cu::sys::cuMemHostRegister_v2(
                    ptr.as_ptr() as *mut c_void,
                    len,
                    cu::sys::CU_MEMHOSTREGISTER_PORTABLE,
                )
            }
            .result()
        })();
        match done {
            Ok(()) => {
                REGISTERED.fetch_add(1, Ordering::Relaxed);
                REGISTERED_BYTES.fetch_add(len as u64, Ordering::Relaxed);
                LIVE.fetch_add(1, Ordering::Relaxed);
                Ok(HostRegistration {
                    ctx: ctx.clone(),
                    ptr,
                    len,
                })
            }
            Err(e) => {
                FAILED.fetch_add(1, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `bytes` lies entirely inside the registered range.
    pub fn covers(&self, bytes: &[u8]) -> bool {
        let start = self.ptr.as_ptr() as usize;
        let p = bytes.as_ptr() as usize;
        p >= start && p + bytes.len() <= start + self.len
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: registered in new at this address; unregistered exactly once, while the
        // memory is still allocated (the owner drops this value first).
        let _ = unsafe { cu::sys::cuMemHostUnregister(self.ptr.as_ptr() as *mut c_void) };
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

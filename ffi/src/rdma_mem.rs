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

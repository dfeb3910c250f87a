//! A safe slot ring over registered memory: `depth` fixed-size slots of one buffer, each lent
//! out by at most one [`SlotToken`] at a time, so code above ffi reads and writes ring memory
//! without `unsafe`.
//!
//! The ownership rule of the RDMA rings (docs/rdma.md) becomes one atomic flag per slot:
//! [`SlotRing::claim`] takes it (`None` when the slot is already out: on the server, a client
//! writing into a slot it holds no credit for), the token lends exactly its slot's bytes, and
//! dropping the token gives the slot back, also when a worker panics while holding it.
//!
//! * Server: the receive loop claims the request slot a completion names and hands the
//!   token to the worker with the job; the reply is staged through a token of the staging
//!   ring's slot of the same index; dropping the request token when the reply is staged frees
//!   the slot for the client's next request.
//! * Client: a send slot's token is its credit. Claim it to build the request, keep it while
//!   the request is in flight (the NIC may still read the slot), drop it when the reply has
//!   arrived; then claim the response slot of the same index to read the reply.
//!
//! What the flag cannot stop is the NIC: a peer breaking the credit rule may RDMA-write into
//! a slot while a token lends it. The bytes then change under the reader (garbled input the
//! pipeline validates like any other bytes), never memory outside the ring: registration
//! bounds every remote write to the buffer.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use thiserror::Error;

use super::mem::RegisteredBuf;

/// Memory a [`SlotRing`] can be laid over.
///
/// # Safety
/// `base()..base() + len()` must be valid for reads and writes, at the same address on every
/// call, for as long as the value lives, and safe code must not be able to reach those bytes
/// other than through the ring (the implementor's own accessors to them are `unsafe`).
pub unsafe trait RingMemory: Send + Sync {
    /// The first byte.
    fn base(&self) -> NonNull<u8>;
    /// Bytes from `base()`.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A ring's geometry does not fit its memory.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    #[error("a ring needs at least one slot")]
    NoSlots,
    #[error("{depth} slots of {slot_size} B overflow the address space")]
    TooLarge { slot_size: usize, depth: u32 },
    #[error("{depth} slots of {slot_size} B do not fit the {len}-byte buffer")]
    TooSmall {
        slot_size: usize,
        depth: u32,
        len: usize,
    },
}

struct Ring<M> {
    mem: M,
    slot_size: usize,
    /// Set while a token lends the slot.
    busy: Box<[AtomicBool]>,
}

/// `depth` slots of `slot_size` bytes at the start of a memory region, each lent out by at
/// most one [`SlotToken`] at a time. A cheap handle: clones share the memory and the flags.
pub struct SlotRing<M: RingMemory = RegisteredBuf> {
    ring: Arc<Ring<M>>,
}

impl<M: RingMemory> Clone for SlotRing<M> {
    fn clone(&self) -> Self {
        SlotRing {
            ring: self.ring.clone(),
        }
    }
}

impl<M: RingMemory> fmt::Debug for SlotRing<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotRing")
            .field("slot_size", &self.ring.slot_size)
            .field("depth", &self.depth())
            .field("len", &self.ring.mem.len())
            .finish()
    }
}

impl<M: RingMemory> SlotRing<M> {
    /// Lays `depth` slots of `slot_size` bytes over the start of `mem` (all free).
    pub fn new(mem: M, slot_size: usize, depth: u32) -> Result<Self, RingError> {
        if depth == 0 {
            return Err(RingError::NoSlots);
        }
        let need = slot_size
            .checked_mul(depth as usize)
            .ok_or(RingError::TooLarge { slot_size, depth })?;
        if need > mem.len() {
            return Err(RingError::TooSmall {
                slot_size,
                depth,
                len: mem.len(),
            });
        }
        let busy = (0..depth).map(|_| AtomicBool::new(false)).collect();
        Ok(SlotRing {
            ring: Arc::new(Ring {
                mem,
                slot_size,
                busy,
            }),
        })
    }

    pub fn slot_size(&self) -> usize {
        self.ring.slot_size
    }

    pub fn depth(&self) -> u32 {
        self.ring.busy.len() as u32
    }

    /// The memory under the ring (for its address and keys; its bytes only through tokens).
    pub fn memory(&self) -> &M {
        &self.ring.mem
    }

    /// Byte offset of `slot` in the memory; `None` outside the ring.
    pub fn offset(&self, slot: u32) -> Option<usize> {
        (slot < self.depth()).then(|| slot as usize * self.ring.slot_size)
    }

    /// Takes `slot`: `None` when it is outside the ring or a token already holds it.
    pub fn claim(&self, slot: u32) -> Option<SlotToken<M>> {
        let flag = self.ring.busy.get(slot as usize)?;
        // AcqRel: acquire the previous holder's writes (released in SlotToken::drop).
        if flag.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(SlotToken {
            ring: self.ring.clone(),
            slot,
        })
    }

    /// Whether a token holds `slot` now (false outside the ring).
    pub fn is_claimed(&self, slot: u32) -> bool {
        self.ring
            .busy
            .get(slot as usize)
            .is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// Whether `token` was claimed from this ring (or a clone of it).
    pub fn owns(&self, token: &SlotToken<M>) -> bool {
        Arc::ptr_eq(&self.ring, &token.ring)
    }
}

/// Exclusive use of one slot of a [`SlotRing`], until dropped. It keeps the ring's memory
/// alive, so it may move to another thread with the job it belongs to.
pub struct SlotToken<M: RingMemory = RegisteredBuf> {
    ring: Arc<Ring<M>>,
    slot: u32,
}

impl<M: RingMemory> fmt::Debug for SlotToken<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotToken")
            .field("slot", &self.slot)
            .field("slot_size", &self.ring.slot_size)
            .finish()
    }
}

impl<M: RingMemory> SlotToken<M> {
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Byte offset of the slot in the ring's memory (for a work request naming it).
    pub fn offset(&self) -> usize {
        self.slot as usize * self.ring.slot_size
    }

    /// The slot's size in bytes.
    pub fn len(&self) -> usize {
        self.ring.slot_size
    }

    /// The ring's memory (for a work request naming the slot: address, key, PD).
    pub fn memory(&self) -> &M {
        &self.ring.mem
    }

    /// A handle on the ring this slot belongs to: it keeps the ring's memory (and a
    /// registered buffer's registration) alive after the token is given back.
    pub fn ring(&self) -> SlotRing<M> {
        SlotRing {
            ring: self.ring.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ring.slot_size == 0
    }

    fn ptr(&self) -> *mut u8 {
        // SAFETY: SlotRing::new checked depth * slot_size <= mem.len() and slot < depth, so the
        // offset stays inside the memory's allocation.
        unsafe { self.ring.mem.base().as_ptr().add(self.offset()) }
    }

    /// The slot's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the slot lies inside the memory, valid for reads while the ring (which this
        // token keeps alive) lives (RingMemory's contract); this token holds the slot's busy
        // flag, so no other token lends these bytes, and nothing safe reaches them otherwise
        // (see the module docs for a peer breaking the credit rule).
        unsafe { std::slice::from_raw_parts(self.ptr(), self.ring.slot_size) }
    }

    /// Copies the slot's first `dst.len()` bytes (at most the slot) into `dst`; returns how
    /// many. For memory a peer can still RDMA-write (a server's landing ring): the copy is
    /// what the reader validates and uses, and it no longer changes under it.
    pub fn copy_out(&self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.ring.slot_size);
        // SAFETY: the slot lies inside the memory (as for `bytes`) and `dst` is a distinct
        // exclusive borrow of at least n bytes; this token excludes every Rust writer of the
        // slot. A NIC write landing meanwhile changes bytes outside the abstract machine: the
        // copy gets old or new values per byte (any u8 is valid), no reference to the racing
        // bytes is ever formed.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(), dst.as_mut_ptr(), n) };
        n
    }

    /// Reads the naturally aligned little-endian u32 at `offset` of the slot with a volatile
    /// load followed by an acquire fence: the word a peer RDMA-writes last to say that a
    /// message is complete (the memory-polled fast path, docs/rdma.md). `None` when the word
    /// is not inside the slot or not 4-byte aligned in memory. Bytes read after this call
    /// (e.g. [`Self::copy_out`]) are not reordered before the load.
    pub fn load_u32(&self, offset: usize) -> Option<u32> {
        if offset.checked_add(4)? > self.ring.slot_size {
            return None;
        }
        // SAFETY: offset + 4 <= slot_size, so the word lies inside the slot (as for `bytes`).
        let p = unsafe { self.ptr().add(offset) } as *const u32;
        if !p.is_aligned() {
            return None;
        }
        // SAFETY: p is in bounds, aligned and valid for reads (RingMemory's contract); a
        // volatile load forms no reference, so a NIC write landing meanwhile (outside the
        // abstract machine) only decides which value is read; an aligned 4-byte load is one
        // access on every target hacserve builds for.
        let v = unsafe { std::ptr::read_volatile(p) };
        std::sync::atomic::fence(Ordering::Acquire);
        Some(u32::from_le(v))
    }

    /// Writes `value` as the naturally aligned little-endian u32 at `offset` of the slot with
    /// a volatile store (clearing a fast-path word the NIC might otherwise be read as having
    /// written). False when the word is not inside the slot or not aligned.
    pub fn store_u32(&mut self, offset: usize, value: u32) -> bool {
        if offset
            .checked_add(4)
            .is_none_or(|end| end > self.ring.slot_size)
        {
            return false;
        }
        // SAFETY: offset + 4 <= slot_size: inside the slot.
        let p = unsafe { self.ptr().add(offset) } as *mut u32;
        if !p.is_aligned() {
            return false;
        }
        // SAFETY: in bounds, aligned, valid for writes; `&mut self` of the token holding the
        // slot excludes every other Rust access to it.
        unsafe { std::ptr::write_volatile(p, value.to_le()) };
        true
    }

    /// [`Self::copy_out`] from `offset` of the slot: copies at most what lies between
    /// `offset` and the slot's end; returns how many (0 when `offset` is past the end).
    pub fn copy_out_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.ring.slot_size.saturating_sub(offset));
        if n == 0 {
            return 0;
        }
        // SAFETY: offset + n <= slot_size, so the source lies inside the slot; otherwise as
        // for `copy_out`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr().add(offset), dst.as_mut_ptr(), n) };
        n
    }

    /// The slot's bytes, for writing.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for bytes; `&mut self` of the one token holding the flag makes the
        // borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.ring.slot_size) }
    }
}

/// A bounds-checked range of a registered ring slot, as a work request's scatter entry
/// names it (address, length, key) with the protection domain it is registered in; taken
/// with [`SlotToken::range`] and posted with
/// [`super::conn::RcEndpoint::post_write_from`]. Plain numbers: holding one keeps nothing
/// alive, the slot's token does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SgeRange {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) lkey: u32,
    /// The PD's address, compared only.
    pub(crate) pd: usize,
}

impl SlotToken<RegisteredBuf> {
    /// `len` bytes at `offset` of the slot as a scatter entry; None outside the slot.
    pub fn range(&self, offset: usize, len: usize) -> Option<SgeRange> {
        let end = offset.checked_add(len)?;
        if end > self.ring.slot_size || len > u32::MAX as usize {
            return None;
        }
        let mem = &self.ring.mem;
        Some(SgeRange {
            addr: mem.addr() + (self.offset() + offset) as u64,
            len: len as u32,
            lkey: mem.lkey(),
            pd: mem.pd_addr(),
        })
    }
}

impl<M: RingMemory> Drop for SlotToken<M> {
    fn drop(&mut self) {
        // Release: the next claimer sees every write made through this token.
        self.ring.busy[self.slot as usize].store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma::mem::HostBuf;

    fn ring(slot_size: usize, depth: u32) -> SlotRing<HostBuf> {
        SlotRing::new(
            HostBuf::new(slot_size * depth as usize).unwrap(),
            slot_size,
            depth,
        )
        .unwrap()
    }

    #[test]
    fn claim_twice_fails_and_drop_releases() {
        let r = ring(64, 4);
        let t = r.claim(2).unwrap();
        assert!(r.is_claimed(2));
        assert!(r.claim(2).is_none(), "a held slot cannot be claimed again");
        assert!(r.clone().claim(2).is_none(), "clones share the flags");
        let other = r.claim(3).unwrap();
        drop(t);
        assert!(!r.is_claimed(2));
        assert!(r.claim(2).is_some());
        assert!(r.is_claimed(3));
        drop(other);
        assert!(!r.is_claimed(3));
    }

    #[test]
    fn copy_out_takes_at_most_the_slot() {
        let r = ring(8, 2);
        let mut t = r.claim(1).unwrap();
        t.bytes_mut().copy_from_slice(b"abcdefgh");
        let mut small = [0u8; 3];
        assert_eq!(t.copy_out(&mut small), 3);
        assert_eq!(&small, b"abc");
        let mut big = [0u8; 12];
        assert_eq!(t.copy_out(&mut big), 8);
        assert_eq!(&big[..8], b"abcdefgh");
        assert_eq!(&big[8..], &[0; 4]);
        let mut tail = [0u8; 4];
        assert_eq!(t.copy_out_at(6, &mut tail), 2);
        assert_eq!(&tail[..2], b"gh");
        assert_eq!(t.copy_out_at(8, &mut tail), 0);
        assert_eq!(t.copy_out_at(usize::MAX, &mut tail), 0);
    }

    #[test]
    fn words_load_and_store_inside_the_slot_only() {
        let r = ring(16, 2);
        let mut t = r.claim(1).unwrap();
        assert!(t.store_u32(12, 0x0102_0304));
        assert_eq!(&t.bytes()[12..16], &[4, 3, 2, 1], "little-endian");
        assert_eq!(t.load_u32(12), Some(0x0102_0304));
        assert_eq!(t.load_u32(13), None, "unaligned");
        assert_eq!(t.load_u32(16), None, "outside the slot");
        assert_eq!(t.load_u32(usize::MAX), None);
        assert!(!t.store_u32(14, 1));
        assert!(!t.store_u32(16, 1));
        assert_eq!(
            r.claim(0).unwrap().load_u32(12),
            Some(0),
            "the other slot is untouched"
        );
    }

    #[test]
    fn bounds() {
        let r = ring(64, 4);
        assert!(r.claim(4).is_none());
        assert!(r.claim(u32::MAX).is_none());
        assert!(!r.is_claimed(4));
        assert_eq!(r.offset(3), Some(192));
        assert_eq!(r.offset(4), None);
        assert_eq!(
            SlotRing::new(HostBuf::new(255).unwrap(), 64, 4).unwrap_err(),
            RingError::TooSmall {
                slot_size: 64,
                depth: 4,
                len: 255
            }
        );
        assert_eq!(
            SlotRing::new(HostBuf::new(64).unwrap(), 64, 0).unwrap_err(),
            RingError::NoSlots
        );
        assert_eq!(
            SlotRing::new(HostBuf::new(64).unwrap(), usize::MAX, 2).unwrap_err(),
            RingError::TooLarge {
                slot_size: usize::MAX,
                depth: 2
            }
        );
        // A longer buffer is fine: the ring uses its start.
        let r = SlotRing::new(HostBuf::new(1000).unwrap(), 64, 4).unwrap();
        assert_eq!(r.claim(3).unwrap().bytes().len(), 64);
    }

    #[test]
    fn a_token_lends_exactly_its_slot() {
        let r = ring(16, 3);
        let base = r.memory().base().as_ptr() as usize;
        let mut toks: Vec<_> = (0..3).map(|s| r.claim(s).unwrap()).collect();
        for (i, t) in toks.iter_mut().enumerate() {
            assert_eq!(t.slot(), i as u32);
            assert_eq!(t.offset(), i * 16);
            assert_eq!(t.len(), 16);
            let b = t.bytes_mut();
            assert_eq!(b.len(), 16);
            assert_eq!(b.as_ptr() as usize, base + i * 16);
            b.fill(i as u8 + 1);
        }
        for (i, t) in toks.iter().enumerate() {
            assert!(t.bytes().iter().all(|&x| x == i as u8 + 1), "slot {i}");
        }
        drop(toks);
        // Bytes stay between claims (a client rewrites only what changes).
        assert_eq!(r.claim(1).unwrap().bytes(), &[2u8; 16]);
        assert!(r.owns(&r.claim(0).unwrap()));
        assert!(!ring(16, 3).owns(&r.claim(0).unwrap()));
    }

    #[test]
    fn a_panicking_holder_frees_its_slot() {
        let r = ring(8, 2);
        let t = r.claim(1).unwrap();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = t;
            panic!("worker failed");
        }));
        assert!(res.is_err());
        assert!(!r.is_claimed(1));
    }

    #[test]
    fn tokens_cross_threads_and_keep_the_memory() {
        let r = ring(8, 8);
        let mut t = r.claim(5).unwrap();
        let h = std::thread::spawn(move || {
            t.bytes_mut().copy_from_slice(b"from the");
            t
        });
        let t = h.join().unwrap();
        assert_eq!(t.bytes(), b"from the");
        drop(r);
        // The token outlives every ring handle: the memory is still there.
        assert_eq!(t.bytes(), b"from the");
    }

    #[test]
    fn one_winner_per_slot() {
        let r = ring(8, 1);
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let r = r.clone();
                    s.spawn(move || r.claim(0).map(std::mem::forget).is_some() as usize)
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
        assert!(r.is_claimed(0), "a forgotten token keeps its slot");
    }
}

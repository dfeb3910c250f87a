//! One client's connection on the server, shared by the receive loop (which polls it and
//! answers from it), the workers (which reply through it) and the connection manager (which
//! sets it up and frees it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hacserve_ffi::rdma::{HostBuf, RcEndpoint, SlotRing, SlotToken};

use super::admission::Reservation;
use super::wire::*;
use super::{rdma_err, SlotWriter, WR_SEND};
use crate::contract::TransportError;
use crate::protocol::{header_bytes, ReplyBuffer, HEADER_LEN};

/// Registered buffers of a connection's endpoint: the reply staging ring, and with host
/// addressing the landing ring clients write their requests into (with GPU addressing that
/// ring is the endpoint's GPU buffer 0).
pub(super) const STAGE_BUF: usize = 0;
pub(super) const LANDING_BUF: usize = 1;

/// One client's connection on the server: its QP, its landing ring (remote-writable, only
/// its own slots), its private copy ring (server-owned, unregistered) and its reply staging
/// ring (local only).
pub struct ServerConn {
    pub(super) ep: RcEndpoint,
    /// Where each request is read from: slot i holds a copy of landing slot i, taken when the
    /// request's completion arrived. Its token is the request's credit on the server side.
    pub(super) copy: SlotRing<HostBuf>,
    pub(super) client_id: u32,
    /// The run's client count the client declared (`rdma_client -c`).
    pub(super) total_clients: u32,
    pub(super) slot_size: usize,
    pub(super) depth: u32,
    pub(super) resp_slot_size: usize,
    pub(super) resp_addr: u64,
    pub(super) resp_rkey: u32,
    pub(super) alive: AtomicBool,
    /// The landing ring is GPU buffer 0 of `ep` (GPUDirect).
    pub(super) gpu_ring: bool,
    /// Reply writes posted (by the loop or a worker) and completed (counted by the loop): a
    /// gap that does not shrink is a client not taking its replies.
    pub(super) replies_posted: AtomicU64,
    pub(super) replies_done: AtomicU64,
    /// Declared last: given back after `ep` has freed the memory.
    pub(super) reservation: Reservation,
}

impl ServerConn {
    pub(super) fn new(
        ep: RcEndpoint,
        copy: SlotRing<HostBuf>,
        req: &ConnectRequest,
        gpu_ring: bool,
        reservation: Reservation,
    ) -> ServerConn {
        ServerConn {
            ep,
            copy,
            client_id: req.client_id,
            total_clients: req.total_clients,
            slot_size: req.slot_size as usize,
            depth: req.depth,
            resp_slot_size: req.resp_slot_size as usize,
            resp_addr: req.resp_addr,
            resp_rkey: req.resp_rkey,
            alive: AtomicBool::new(true),
            gpu_ring,
            replies_posted: AtomicU64::new(0),
            replies_done: AtomicU64::new(0),
            reservation,
        }
    }

    pub(super) fn handle(&self) -> usize {
        self.ep.handle()
    }
    pub(super) fn client_id(&self) -> u32 {
        self.client_id
    }
    pub(super) fn depth(&self) -> u32 {
        self.depth
    }
    pub(super) fn slot_size(&self) -> usize {
        self.slot_size
    }
    pub(super) fn max_inline(&self) -> usize {
        self.ep.max_inline()
    }
    pub(super) fn pinned_bytes(&self) -> u64 {
        self.reservation.bytes()
    }
    pub(super) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Marks the connection dead and disconnects it; true when it was alive (this call
    /// closed it, so the caller logs why).
    pub(super) fn close(&self) -> bool {
        let was = self.alive.swap(false, Ordering::AcqRel);
        if was {
            let _ = self.ep.disconnect();
        }
        was
    }

    /// Reply writes posted whose completion has not been seen.
    pub(super) fn replies_unacknowledged(&self) -> u64 {
        let posted = self.replies_posted.load(Ordering::Acquire);
        posted.saturating_sub(self.replies_done.load(Ordering::Relaxed))
    }

    /// Copies the first `len` bytes of landing slot `slot` (host or GPU memory, which the
    /// client can write) into the copy slot `req` holds: everything after this reads only
    /// the copy.
    pub(super) fn copy_request(
        &self,
        req: &mut SlotToken<HostBuf>,
        len: usize,
    ) -> Result<(), String> {
        let slot = req.slot();
        let dst = req
            .bytes_mut()
            .get_mut(..len)
            .ok_or_else(|| format!("slot {slot} + {len} B outside the copy ring"))?;
        if self.gpu_ring {
            return self
                .ep
                .gpu_buf(0)
                .copy_to_host(slot as usize * self.slot_size, dst);
        }
        // Only this loop claims landing slots: the claim cannot fail for a slot in range.
        let landing = self
            .ep
            .ring(LANDING_BUF)
            .claim(slot)
            .ok_or_else(|| format!("landing slot {slot} unavailable"))?;
        landing.copy_out(dst);
        Ok(())
    }

    /// The first `len` bytes of the request `req` holds (the server's copy).
    pub(super) fn request<'a>(&self, req: &'a SlotToken<HostBuf>, len: usize) -> &'a [u8] {
        req.bytes().get(..len).unwrap_or(&[])
    }

    /// Stages a reply to the request `req` holds with `write`, which gets the request's
    /// first `len` bytes and the staging slot of the same index, and writes it into the
    /// client's response slot of that index; the request slot is free once the reply is
    /// staged. `write` returning None stages nothing and gives `req` back. Returns what
    /// `write` returned, the reply's header (for the accounting) and whether the post worked.
    #[allow(clippy::type_complexity)]
    pub(super) fn reply_with<R>(
        &self,
        req: SlotToken<HostBuf>,
        len: usize,
        write: impl FnOnce(&[u8], &mut dyn ReplyBuffer) -> Option<R>,
    ) -> Result<(R, [u8; HEADER_LEN], Result<(), TransportError>), SlotToken<HostBuf>> {
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

    pub(super) fn post_reply(
        &self,
        slot: u32,
        off: usize,
        len: usize,
    ) -> Result<(), TransportError> {
        if !self.alive.load(Ordering::Acquire) {
            return Err(rdma_err(format!("client {} disconnected", self.client_id)));
        }
        let imm = encode_imm(slot, len as u32)
            .ok_or_else(|| rdma_err(format!("reply of {len} bytes does not fit an immediate")))?;
        let remote = self.resp_addr + (slot as usize * self.resp_slot_size) as u64;
        // Counted before the post, so that its completion never runs ahead of the count.
        self.replies_posted.fetch_add(1, Ordering::AcqRel);
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
                self.replies_posted.fetch_sub(1, Ordering::AcqRel);
                self.alive.store(false, Ordering::Release);
                e.into()
            })
    }
}

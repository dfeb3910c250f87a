//! One client's connection on the server, shared by the receive loop (which polls it and
//! answers from it), the workers (which reply through it) and the connection manager (which
//! sets it up and frees it).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use crossbeam_queue::ArrayQueue;

use hacserve_ffi::gpu::resident::DeviceSpan;
use hacserve_ffi::gpu::transfer::Mover;
use hacserve_ffi::rdma::{
    EventWait, HostBuf, RcEndpoint, RdmaError, RegisteredBuf, RingMemory, SlotRing, SlotToken,
    WcStatus, WorkCompletion,
};

use super::admission::Reservation;
use super::gpu_ring::GpuRingSource;
use super::wire::*;
use super::{rdma_err, SlotWriter, WR_LENT, WR_SEND};
use crate::contract::{LentReply, Resident, TransportError};
use crate::protocol::{header_bytes, ReplyBuffer, Task, HEADER_LEN};

/// Where a connection's requests land.
pub(super) enum Link {
    /// Host memory: the endpoint's landing ring (LANDING_BUF) and staging ring (STAGE_BUF).
    Host(RcEndpoint),
    /// GPU memory (`-a 1`): the ring source (the NIC through verbs, or the loopback stand-in)
    /// and the server-private host slots each reply's host part is written into first.
    Gpu {
        source: Box<dyn GpuRingSource>,
        stage: SlotRing<HostBuf>,
    },
}

/// Zero-copy reply writes per slot whose completion may still be unreaped (the client can
/// take a reply, send again and be answered again before the loop polls the first write's
/// completion); a fifth falls back to copying.
const LENT_PER_SLOT: usize = 4;

/// Registered buffers of a connection's endpoint: the reply staging ring, and with host
/// addressing the landing ring clients write their requests into (with GPU addressing that
/// ring is the endpoint's GPU buffer 0).
pub(super) const STAGE_BUF: usize = 0;
pub(super) const LANDING_BUF: usize = 1;

/// One client's connection on the server: its QP, its landing ring (remote-writable, only
/// its own slots), its private copy ring (server-owned, unregistered) and its reply staging
/// ring (local only).
pub struct ServerConn {
    pub(super) link: Link,
    /// Zero-copy replies (a proxy's): per slot, the backend response slots whose bytes a
    /// posted reply write is reading, oldest first, each held until that write's completion
    /// (send completions come in posting order) or until the connection is freed. Declared
    /// after `link`: given back only once the QP is destroyed.
    pub(super) lent: Box<[ArrayQueue<SlotToken<RegisteredBuf>>]>,
    /// Requests stay in the landing ring (only their header is copied) for a forwarder to
    /// post from: a proxy's inbound connection in a shared protection domain.
    pub(super) zero_copy: bool,
    /// Where each request is read from: slot i holds a copy of landing slot i, taken when the
    /// request's completion arrived. Its token is the request's credit on the server side.
    pub(super) copy: SlotRing<HostBuf>,
    pub(super) client_id: u32,
    /// The run's client count the client declared (`rdma_client -c`).
    pub(super) total_clients: u32,
    pub(super) slot_size: usize,
    /// The memory-polled fast path was granted (docs/rdma.md, "Fast path").
    pub(super) fast: bool,
    /// Largest request: the slot, less the completion word on a fast-path connection.
    pub(super) usable: usize,
    /// Per slot, the generation of the latest request taken from it (both paths count);
    /// written by the receive loop when it takes the request, read by whoever replies from
    /// that slot (the job hand-off orders the two). Its reply's word carries it.
    pub(super) gens: Box<[AtomicU8]>,
    pub(super) depth: u32,
    pub(super) resp_slot_size: usize,
    pub(super) resp_addr: u64,
    pub(super) resp_rkey: u32,
    pub(super) alive: AtomicBool,
    /// Reply writes posted (by the loop or a worker) and completed (counted by the loop): a
    /// gap that does not shrink is a client not taking its replies.
    pub(super) replies_posted: AtomicU64,
    pub(super) replies_done: AtomicU64,
    /// Declared last: given back after `ep` has freed the memory.
    pub(super) reservation: Reservation,
}

impl ServerConn {
    pub(super) fn new(
        link: Link,
        copy: SlotRing<HostBuf>,
        req: &ConnectRequest,
        reservation: Reservation,
        fast: bool,
        zero_copy: bool,
    ) -> ServerConn {
        let fast = fast && matches!(link, Link::Host(_));
        let zero_copy = zero_copy && matches!(link, Link::Host(_));
        let lent_slots = if zero_copy { req.depth } else { 0 };
        ServerConn {
            link,
            lent: (0..lent_slots)
                .map(|_| ArrayQueue::new(LENT_PER_SLOT))
                .collect(),
            zero_copy,
            copy,
            client_id: req.client_id,
            total_clients: req.total_clients,
            slot_size: req.slot_size as usize,
            fast,
            usable: req.slot_size as usize - if fast { FAST_WORD_LEN } else { 0 },
            gens: (0..req.depth).map(|_| AtomicU8::new(0)).collect(),
            depth: req.depth,
            resp_slot_size: req.resp_slot_size as usize,
            resp_addr: req.resp_addr,
            resp_rkey: req.resp_rkey,
            alive: AtomicBool::new(true),
            replies_posted: AtomicU64::new(0),
            replies_done: AtomicU64::new(0),
            reservation,
        }
    }

    pub(super) fn handle(&self) -> usize {
        match &self.link {
            Link::Host(ep) => ep.handle(),
            Link::Gpu { source, .. } => source.handle(),
        }
    }
    /// The GPU ring source, for GPU-memory connections.
    pub(super) fn gpu(&self) -> Option<&dyn GpuRingSource> {
        match &self.link {
            Link::Host(_) => None,
            Link::Gpu { source, .. } => Some(source.as_ref()),
        }
    }
    pub(super) fn poll(&self, wcs: &mut [WorkCompletion]) -> Result<usize, RdmaError> {
        match &self.link {
            Link::Host(ep) => ep.poll(wcs),
            Link::Gpu { source, .. } => source.poll(wcs),
        }
    }
    /// Event mode: arms the CQ's completion channel (host links; a GPU ring is polled).
    pub(super) fn arm(&self) -> Result<(), RdmaError> {
        match &self.link {
            Link::Host(ep) => ep.arm(),
            Link::Gpu { .. } => Ok(()),
        }
    }
    /// Event mode: adds the CQ's completion channel to `w`.
    pub(super) fn add_to(&self, w: &mut EventWait) {
        if let Link::Host(ep) = &self.link {
            w.add(ep);
        }
    }
    /// Event mode: takes and acknowledges the completion events waiting.
    pub(super) fn take_events(&self) -> Result<u32, RdmaError> {
        match &self.link {
            Link::Host(ep) => ep.take_events(),
            Link::Gpu { .. } => Ok(0),
        }
    }
    /// Posts a receive again for the next request.
    pub(super) fn rearm(&self, wr_id: u64) -> Result<(), RdmaError> {
        match &self.link {
            Link::Host(ep) => ep.post_recv_empty(wr_id),
            Link::Gpu { source, .. } => source.rearm(wr_id),
        }
    }
    pub(super) fn status_text(&self, status: WcStatus) -> String {
        match &self.link {
            Link::Host(ep) => ep.wc_status_str(status),
            Link::Gpu { source, .. } => source.status_text(status),
        }
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
        match &self.link {
            Link::Host(ep) => ep.max_inline(),
            Link::Gpu { source, .. } => source.max_inline(),
        }
    }
    /// Fast path: the length of the request whose completion word has arrived in landing
    /// slot `slot` (the slot's next generation), if it has. The word is zeroed as it is
    /// taken: a slot whose next requests come as WRITE_WITH_IMM (which leave the word alone)
    /// would otherwise keep it, and 255 requests later, when the generation comes round
    /// again, it would match a second time and the old request be served again. The client
    /// writes this word again only for a later request, after this one's reply.
    pub(super) fn poll_fast(&self, slot: u32) -> Option<u32> {
        let Link::Host(ep) = &self.link else {
            return None;
        };
        let expect = next_generation(self.gens.get(slot as usize)?.load(Ordering::Relaxed));
        // Only the receive loop claims landing slots: the claim fails only out of range.
        let mut landing = ep.ring(LANDING_BUF).claim(slot)?;
        let len = fast_word_len(landing.load_u32(self.usable)?, expect)?;
        landing.store_u32(self.usable, 0);
        Some(len)
    }

    /// Counts a request taken from `slot` (either path): the slot's generation moves on.
    pub(super) fn count_request(&self, slot: u32) {
        if let Some(g) = self.gens.get(slot as usize) {
            g.store(
                next_generation(g.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
        }
    }

    /// Zeroes landing slot `slot`'s completion word: after a request that announced more
    /// than the slot holds (the client may have written over the word), so that its bytes
    /// are never taken for a later request's word.
    pub(super) fn clear_word(&self, slot: u32) {
        if let (true, Link::Host(ep)) = (self.fast, &self.link) {
            if let Some(mut t) = ep.ring(LANDING_BUF).claim(slot) {
                t.store_u32(self.usable, 0);
            }
        }
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
            let _ = match &self.link {
                Link::Host(ep) => ep.disconnect(),
                Link::Gpu { source, .. } => source.disconnect(),
            };
        }
        was
    }

    /// Reply writes posted whose completion has not been seen.
    pub(super) fn replies_unacknowledged(&self) -> u64 {
        let posted = self.replies_posted.load(Ordering::Acquire);
        posted.saturating_sub(self.replies_done.load(Ordering::Relaxed))
    }

    /// The landing slot `slot` itself, for a zero-copy request (held by its job until it is
    /// answered: the receive loop claims no landing slot that is held).
    pub(super) fn claim_landing(&self, slot: u32) -> Option<SlotToken<RegisteredBuf>> {
        match &self.link {
            Link::Host(ep) => ep.ring(LANDING_BUF).claim(slot),
            Link::Gpu { .. } => None,
        }
    }

    /// A reply write's completion (`wr_id`): gives back the backend response slot a
    /// zero-copy reply was posted from.
    pub(super) fn release_lent(&self, wr_id: u64) {
        if wr_id & WR_LENT == 0 {
            return;
        }
        let slot = (wr_id & 0xffff_ffff) as usize;
        if let Some(q) = self.lent.get(slot) {
            drop(q.pop());
        }
    }

    /// Posts the reply `reply` holds (a backend response slot registered in this
    /// connection's PD) straight from there into the client's response slot of the request
    /// `req` holds, without copying it: on the fast path with the completion word gathered
    /// after it from the staging slot, else as WRITE_WITH_IMM. The response slot is kept
    /// until the write completes. Gives both back when the reply cannot be posted so (a GPU
    /// ring, another PD, too many unreaped writes): the caller copies it instead.
    #[allow(clippy::type_complexity)]
    pub(super) fn post_lent_reply(
        &self,
        req: SlotToken<HostBuf>,
        reply: LentReply,
    ) -> Result<Result<(), TransportError>, (SlotToken<HostBuf>, LentReply)> {
        let Link::Host(ep) = &self.link else {
            return Err((req, reply));
        };
        let slot = req.slot();
        let Some(queue) = self.lent.get(slot as usize) else {
            return Err((req, reply));
        };
        if !ep.can_post_from(&reply.token) || queue.is_full() {
            return Err((req, reply));
        }
        let n = reply.len;
        // On a fast-path connection a reply never reaches the slot's completion word.
        let max = self.resp_slot_size - if self.fast { FAST_WORD_LEN } else { 0 };
        if n > max {
            return Ok(Err(TransportError::ReplyTooLarge { got: n, max }));
        }
        let Some(body) = reply.token.range(reply.at, n) else {
            return Ok(Err(rdma_err("lent reply outside its slot")));
        };
        // Only the holder of the request slot uses the staging slot of that index (the
        // previous reply of the slot may still be between its request slot's release and
        // its post: `claim_staging` waits for that).
        let Some(mut stage) = claim_staging(ep.ring(STAGE_BUF), slot) else {
            return Ok(Err(rdma_err("staging slot busy")));
        };
        let word = self.fast_reply_word(slot, n, stage.len());
        let word_range = match word {
            Some(w) => {
                stage.bytes_mut()[..FAST_WORD_LEN].copy_from_slice(&w.to_le_bytes());
                stage.range(0, FAST_WORD_LEN)
            }
            None => None,
        };
        // Queued before the post: its completion may be reaped at once.
        if let Err(token) = queue.push(reply.token) {
            return Err((
                req,
                LentReply {
                    token,
                    at: reply.at,
                    len: n,
                },
            ));
        }
        // The request slot is free before the post, as in `stage_and_post`: the client's
        // next request into it may come as soon as this reply lands.
        drop(req);
        let wr = WR_SEND | WR_LENT | slot as u64;
        let sent = match (word, word_range) {
            (Some(_), Some(w)) => {
                let word_at = self.resp_slot_size - FAST_WORD_LEN;
                self.post_counted(slot, n, |remote, _| {
                    ep.post_write_from(
                        wr,
                        &[body, w],
                        remote + (word_at - n) as u64,
                        self.resp_rkey,
                        None,
                    )
                })
            }
            _ => self.post_counted(slot, n, |remote, imm| {
                ep.post_write_from(wr, &[body], remote, self.resp_rkey, Some(imm))
            }),
        };
        if sent.is_err() {
            // Never posted: no completion will give it back.
            let _ = queue.pop();
        }
        drop(stage);
        Ok(sent)
    }

    /// Copies the first `len` bytes of host landing slot `slot` (which the client can write)
    /// into the copy slot `req` holds: everything after this reads only the copy. With a GPU
    /// ring only the header is copied (32 bytes device -> host; an echo, whose reply is its
    /// payload, whole): the payload stays where the NIC wrote it. Returns the bytes held
    /// on the host.
    pub(super) fn copy_request(
        &self,
        req: &mut SlotToken<HostBuf>,
        len: usize,
        from: usize,
    ) -> Result<usize, String> {
        let slot = req.slot();
        match &self.link {
            Link::Host(ep) => {
                let dst = req
                    .bytes_mut()
                    .get_mut(..len)
                    .ok_or_else(|| format!("slot {slot} + {len} B outside the copy ring"))?;
                // Only this loop claims landing slots: the claim cannot fail for a slot in range.
                let landing = ep
                    .ring(LANDING_BUF)
                    .claim(slot)
                    .ok_or_else(|| format!("landing slot {slot} unavailable"))?;
                if landing.copy_out_at(from, dst) != len {
                    return Err(format!("slot {slot}: {len} B at {from} outside the slot"));
                }
                Ok(len)
            }
            Link::Gpu { source, .. } => {
                let head = len.min(HEADER_LEN);
                copy_from_gpu(source.as_ref(), req, 0, head)?;
                // Byte 7 of the header is the task (protocol.rs, Header::encode).
                let echo = head == HEADER_LEN && req.bytes()[7] == Task::Echo as u8;
                if echo || len < HEADER_LEN {
                    copy_from_gpu(source.as_ref(), req, head, len - head)?;
                    return Ok(len);
                }
                Ok(head)
            }
        }
    }

    /// Where the payload of a GPU-resident request in slot `slot` lies (`len` bytes after
    /// the header), and its device reply slot.
    pub(super) fn resident(&self, slot: u32, len: usize) -> Option<Resident<'_>> {
        let source = self.gpu()?;
        Some(Resident {
            payload: source.request(slot, HEADER_LEN, len)?,
            reply: source.reply(slot)?,
            stream: source.stream(),
        })
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
        match &self.link {
            Link::Host(ep) => {
                // The staging slot's own offset: its ring's slots are the server's response
                // slot size, which the client's (`resp_slot_size`) may exceed.
                let stage = ep.ring(STAGE_BUF);
                let off = stage.offset(slot).unwrap_or(0);
                self.stage_and_post(claim_staging(stage, slot), req, len, write, |n, _, fast| {
                    self.post_reply(slot, off, n, fast)
                })
            }
            Link::Gpu { source, stage } => self.stage_and_post(
                claim_staging(stage, slot),
                req,
                len,
                write,
                |_, staged, _| self.post_gpu_reply(source.as_ref(), slot, staged),
            ),
        }
    }

    /// [`Self::reply_with`] over the staging slot `stage` (claimed for the request's slot),
    /// with `post` sending the `n` staged bytes.
    #[allow(clippy::type_complexity)]
    fn stage_and_post<R, M: RingMemory>(
        &self,
        mut stage: Option<SlotToken<M>>,
        req: SlotToken<HostBuf>,
        len: usize,
        write: impl FnOnce(&[u8], &mut dyn ReplyBuffer) -> Option<R>,
        post: impl FnOnce(usize, &[u8], Option<u32>) -> Result<(), TransportError>,
    ) -> Result<(R, [u8; HEADER_LEN], Result<(), TransportError>), SlotToken<HostBuf>> {
        let slot = req.slot();
        let request = self.request(&req, len);
        let (written, reply_len, head) = match stage.as_mut().map(SlotToken::bytes_mut) {
            Some(buf) => {
                let mut w = SlotWriter { buf, len: 0 };
                let r = write(request, &mut w);
                (r, Some(w.len), header_bytes(w.bytes()))
            }
            None => {
                // The previous reply of this slot still held its staging slot past
                // [`STAGING_WAIT`] (a thread stalled mid-post), or the slot is out of range:
                // written aside so that the outcome is known, and reported undeliverable.
                let mut aside = Vec::new();
                let r = write(request, &mut aside);
                (r, None, [0; HEADER_LEN])
            }
        };
        let Some(r) = written else {
            return Err(req);
        };
        // The reply is staged: the request slot is free for the client's next request, which
        // it sends once it has seen this reply. Freed before the post, so that next request,
        // however soon it comes, is never taken for one sent without credit.
        drop(req);
        let sent = match (reply_len, stage.as_mut()) {
            (Some(n), Some(staged)) => {
                // Fast path: the completion word right after the reply, sent with it.
                let word = self.fast_reply_word(slot, n, staged.len());
                if let Some(w) = word {
                    staged.bytes_mut()[n..n + FAST_WORD_LEN].copy_from_slice(&w.to_le_bytes());
                }
                post(n, &staged.bytes()[..n], word)
            }
            _ => Err(rdma_err("staging slot out of range or busy")),
        };
        // Posted: the next reply of this slot may stage (it waits in `claim_staging` for the
        // moment between the request slot's release above and this drop).
        drop(stage);
        Ok((r, head, sent))
    }

    /// The completion word of an `n`-byte reply from slot `slot` if it goes on the fast path:
    /// negotiated, small, and room for the word after it in the `stage_len`-byte staging slot
    /// and before the client's response slot ends.
    fn fast_reply_word(&self, slot: u32, n: usize, stage_len: usize) -> Option<u32> {
        let fits = n <= FAST_MAX_LEN
            && n + FAST_WORD_LEN <= stage_len
            && n + FAST_WORD_LEN <= self.resp_slot_size;
        if !(self.fast && fits) {
            return None;
        }
        let generation = self.gens.get(slot as usize)?.load(Ordering::Relaxed);
        fast_word(generation, n as u32)
    }

    /// Posts a reply of a GPU-ring connection: the staged host bytes, then, where their
    /// header announces more than they hold (a reply whose top-5 part the engine wrote on
    /// the GPU), the rest from the device reply slot.
    fn post_gpu_reply(
        &self,
        source: &dyn GpuRingSource,
        slot: u32,
        staged: &[u8],
    ) -> Result<(), TransportError> {
        if !self.alive.load(Ordering::Acquire) {
            return Err(rdma_err(format!("client {} disconnected", self.client_id)));
        }
        // Bytes 24..28 of our own reply header: the body length it announces.
        let announced = match staged.get(24..28) {
            Some(b) => HEADER_LEN + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
            None => staged.len(),
        };
        let device_len = announced.saturating_sub(staged.len());
        let total = staged.len() + device_len;
        if total > self.resp_slot_size {
            return Err(rdma_err(format!(
                "reply of {total} bytes exceeds the {}-byte response slot",
                self.resp_slot_size
            )));
        }
        self.post_counted(slot, total, |remote, imm| {
            source.post_reply(
                WR_SEND | slot as u64,
                slot,
                staged,
                device_len,
                remote,
                self.resp_rkey,
                imm,
            )
        })
    }

    /// Posts the `len`-byte reply staged at `off` of the staging ring into the client's
    /// response slot `slot`: as WRITE_WITH_IMM, or with `fast` (the completion word, already
    /// written right after the reply in the staging slot) as the fast path's plain WRITE.
    pub(super) fn post_reply(
        &self,
        slot: u32,
        off: usize,
        len: usize,
        fast: Option<u32>,
    ) -> Result<(), TransportError> {
        let Link::Host(ep) = &self.link else {
            return Err(rdma_err("host reply on a GPU-ring connection"));
        };
        if fast.is_some() {
            // One plain WRITE of the reply and its word, placed so that the word lands on
            // the response slot's last 4 bytes and the reply right before it.
            let word_at = self.resp_slot_size - FAST_WORD_LEN;
            return self.post_counted(slot, len, |remote, _| {
                ep.post_write(
                    WR_SEND | slot as u64,
                    STAGE_BUF,
                    off,
                    len + FAST_WORD_LEN,
                    remote + (word_at - len) as u64,
                    self.resp_rkey,
                )
            });
        }
        self.post_counted(slot, len, |remote, imm| {
            ep.post_write_imm(
                WR_SEND | slot as u64,
                STAGE_BUF,
                off,
                len,
                remote,
                self.resp_rkey,
                imm,
            )
        })
    }

    /// Posts a `len`-byte reply into the client's response slot `slot` with `post` (given
    /// the remote address and the immediate), counted in `replies_posted`; a failed post
    /// marks the connection dead.
    fn post_counted(
        &self,
        slot: u32,
        len: usize,
        post: impl FnOnce(u64, u32) -> Result<(), RdmaError>,
    ) -> Result<(), TransportError> {
        if !self.alive.load(Ordering::Acquire) {
            return Err(rdma_err(format!("client {} disconnected", self.client_id)));
        }
        let imm = encode_imm(slot, len as u32)
            .ok_or_else(|| rdma_err(format!("reply of {len} bytes does not fit an immediate")))?;
        let remote = self.resp_addr + (slot as usize * self.resp_slot_size) as u64;
        // Counted before the post, so that its completion never runs ahead of the count.
        self.replies_posted.fetch_add(1, Ordering::AcqRel);
        post(remote, imm).map_err(|e| {
            self.replies_posted.fetch_sub(1, Ordering::AcqRel);
            self.alive.store(false, Ordering::Release);
            e.into()
        })
    }
}

/// `len` bytes of GPU request slot `req.slot()` from `offset` into the same place of the copy
/// slot `req` holds (device -> host, counted as the server's).
fn copy_from_gpu(
    source: &dyn GpuRingSource,
    req: &mut SlotToken<HostBuf>,
    offset: usize,
    len: usize,
) -> Result<(), String> {
    if len == 0 {
        return Ok(());
    }
    let slot = req.slot();
    let span: DeviceSpan<'_> = source
        .request(slot, offset, len)
        .ok_or_else(|| format!("slot {slot} + {offset} + {len} B outside the GPU ring"))?;
    let dst = req
        .bytes_mut()
        .get_mut(offset..offset + len)
        .ok_or_else(|| format!("slot {slot} + {len} B outside the copy ring"))?;
    span.copy_to_host(source.stream(), dst, Mover::Server)
        .map_err(|e| e.to_string())
}

/// How long a reply waits for its staging slot while the previous reply of the same slot is
/// still being posted (its request slot is freed before its post, so the client's next
/// request, and its reply, can come that soon).
const STAGING_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Claims staging slot `slot`, waiting while the previous reply of that slot holds it for
/// its post (microseconds, unless its thread was descheduled there); `None` when the slot is
/// out of range or still held after [`STAGING_WAIT`].
fn claim_staging<M: RingMemory>(ring: &SlotRing<M>, slot: u32) -> Option<SlotToken<M>> {
    let mut deadline = None;
    loop {
        if let Some(token) = ring.claim(slot) {
            return Some(token);
        }
        if !ring.is_claimed(slot) {
            // Out of range, or given back just now: one more try decides.
            return ring.claim(slot);
        }
        let now = std::time::Instant::now();
        if now > *deadline.get_or_insert(now + STAGING_WAIT) {
            return None;
        }
        std::thread::yield_now();
    }
}

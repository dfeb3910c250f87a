//! The RDMA client transport: [`RdmaClient`] implements [`ClientTransport`] with a
//! registered send ring and a response ring; `send` writes into the server's request slot,
//! `recv` polls for the reply's completion and lends the response slot. Pipelining (up to
//! the ring depth in flight) is offered to the proxies and benchmarks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hacserve_ffi::rdma::{
    AccessFlags, CmEvent, CmEventKind, CmId, EventChannel, EventWait, PdShare, QpSizes, RcEndpoint,
    Rdma, SlotToken, WcOpcode, WcStatus, WorkCompletion,
};
use hacserve_ffi::signal;

use super::wire::*;
use super::{rdma_err, resolve, WR_SEND};
use crate::contract::copies::count_payload_copy;
use crate::contract::{ClientTransport, Lent, LentReply, PollMode, TransportError};

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
    /// The run's client count (`-c/--total-clients`), told to the server, which names its
    /// log folder after it as the original does.
    pub total_clients: u32,
    /// Ask for the memory-polled fast path (docs/rdma.md, "Fast path"): granted only by a
    /// server that knows it, for rings it fits, and never in [`PollMode::Event`] (a waiter
    /// sleeping on completions cannot see a message that raises none).
    pub fast_path: bool,
}

/// How a request goes out.
#[derive(Debug, Clone, Copy)]
enum Post {
    /// The fast path where negotiated and the message is small, else WRITE_WITH_IMM.
    Auto,
    /// WRITE_WITH_IMM with exactly this immediate (tests of the server's validation).
    Imm(u32),
}

/// While waiting for a reply in [`PollMode::Event`]: the longest sleep on the completion
/// channel before the stop flag, the deadline and the connection are looked at again.
const EVENT_TICK_MS: i32 = 100;

/// Pause before the first attempt to connect again after a loss (rdma_client, the proxies'
/// pool), doubling after each failed attempt up to [`RECONNECT_MAX`].
pub const RECONNECT_FIRST: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// The pause after `pause` in the reconnection backoff.
pub fn next_reconnect_pause(pause: Duration) -> Duration {
    (pause * 2).min(RECONNECT_MAX)
}

/// Client end: one RC connection, a registered send ring and response ring.
pub struct RdmaClient {
    /// Where it connected and how, to connect again ([`ClientTransport::reconnect`]).
    host: String,
    port: u16,
    receives: u32,
    /// The shared protection domain it was set up in (zero-copy forwarding), kept to
    /// connect again in it.
    pd_share: Option<Arc<PdShare>>,
    channel: Arc<EventChannel>,
    ep: RcEndpoint,
    cfg: RdmaClientConfig,
    accept: AcceptReply,
    resp_slot_size: usize,
    /// The fast path was granted: small requests and replies go as a plain RDMA WRITE and a
    /// completion word in the slot's last 4 bytes, which messages never reach.
    fast: bool,
    /// Largest request: the slot, less the completion word on a fast-path connection.
    usable: usize,
    /// Per slot, the generation of its latest request (every request counts, whatever path
    /// it took; the server counts the same and stamps its reply's word with it).
    send_gen: Vec<u8>,
    /// Event mode's wait on the CQ's completion channel (one fd, preallocated).
    waiter: Option<EventWait>,
    next_slot: u32,
    /// A send slot's token is its credit: held from the send until the reply arrives.
    in_flight: Vec<Option<SlotToken>>,
    /// The next send slot, claimed by [`RdmaClient::next_send_slot`] and not yet sent.
    preparing: Option<SlotToken>,
    /// Every response slot, held while the connection may receive into it: only the server
    /// writes them, each in answer to the request in the send slot of the same index. A
    /// reply handed out with its slot ([`Self::try_recv_lent`]) leaves None until the
    /// holder gives the slot back; no request goes into that slot before.
    responses: Vec<Option<SlotToken>>,
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
                Some(reason) => TransportError::Refused(reason),
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
    /// Loads the RDMA libraries, resolves `host:port` and connects with rdma_cm. A server
    /// that refuses the connection gives [`TransportError::Refused`] with its reason.
    pub fn connect(host: &str, port: u16, cfg: RdmaClientConfig) -> Result<Self, TransportError> {
        let depth = cfg.depth;
        Self::connect_with_receives(host, port, cfg, depth)
    }

    /// [`Self::connect`] with the connection's PD taken from `share` (one per device): its
    /// rings then share a protection domain with every other endpoint set up in `share`
    /// (a proxy's inbound connections), so [`Self::send_lent`] can post from their slots.
    pub fn connect_in(
        host: &str,
        port: u16,
        cfg: RdmaClientConfig,
        share: Option<Arc<PdShare>>,
    ) -> Result<Self, TransportError> {
        let depth = cfg.depth;
        Self::connect_full(host, port, cfg, depth, share)
    }

    /// [`Self::connect`] posting `receives` receives before connecting instead of one per
    /// slot. Fewer than the depth breaks the protocol: a reply finding no receive is
    /// refused by this NIC (receiver not ready) and the server's write stays unacknowledged,
    /// which is what tests of the server's `--peer-timeout-ms` need.
    pub fn connect_with_receives(
        host: &str,
        port: u16,
        cfg: RdmaClientConfig,
        receives: u32,
    ) -> Result<Self, TransportError> {
        Self::connect_full(host, port, cfg, receives, None)
    }

    fn connect_full(
        host: &str,
        port: u16,
        cfg: RdmaClientConfig,
        receives: u32,
        pd_share: Option<Arc<PdShare>>,
    ) -> Result<Self, TransportError> {
        let rdma = Rdma::load()?;
        check_geometry(cfg.depth, cfg.slot_size).map_err(|e| rdma_err(e.to_string()))?;
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
            // A fast-path request is two work requests (the message, then its word).
            max_send_wr: 2 * depth + 2,
            max_recv_wr: depth,
        };
        let events = cfg.mode == PollMode::Event;
        let mut ep = RcEndpoint::create_in(rdma, id, sizes, events, pd_share.as_deref())?;
        let ask_fast = cfg.fast_path
            && !events
            && fast_path_fits(cfg.slot_size, fast_response_slot_size(cfg.slot_size));
        let resp_slot_size = if ask_fast {
            fast_response_slot_size(cfg.slot_size)
        } else {
            response_slot_size(cfg.slot_size)
        } as usize;
        ep.register_ring(cfg.slot_size as usize, depth, AccessFlags::LOCAL_WRITE)?;
        ep.register_ring(
            resp_slot_size,
            depth,
            AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE,
        )?;
        let responses = (0..depth)
            .map(|slot| ep.ring(RESP_BUF).claim(slot).map(Some))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| rdma_err("response ring shorter than its depth"))?;
        for i in 0..receives.min(depth) {
            ep.post_recv_empty(i as u64)?;
        }
        let req = ConnectRequest {
            flags: if ask_fast { FLAG_FAST_PATH } else { 0 },
            client_id: cfg.client_id,
            slot_size: cfg.slot_size,
            depth,
            resp_slot_size: resp_slot_size as u32,
            resp_addr: ep.buf(RESP_BUF).addr(),
            resp_rkey: ep.buf(RESP_BUF).rkey(),
            total_clients: cfg.total_clients,
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
        let fast = ask_fast && accept.flags & FLAG_FAST_PATH != 0;
        let usable = cfg.slot_size as usize - if fast { FAST_WORD_LEN } else { 0 };
        let waiter = events.then(|| {
            let mut w = EventWait::with_capacity(1);
            w.add(&ep);
            w
        });
        Ok(RdmaClient {
            host: host.to_string(),
            port,
            receives,
            pd_share,
            channel,
            ep,
            in_flight: (0..depth).map(|_| None).collect(),
            preparing: None,
            responses,
            cfg,
            accept,
            resp_slot_size,
            fast,
            usable,
            send_gen: vec![0; depth as usize],
            waiter,
            next_slot: 0,
            wc: [WorkCompletion::default()],
        })
    }

    /// The slot the next request goes into.
    pub fn next_slot(&self) -> u32 {
        self.next_slot
    }

    /// Whether the memory-polled fast path was negotiated (asked for and granted).
    pub fn fast_path(&self) -> bool {
        self.fast
    }

    /// The server's payload limit for this connection.
    pub fn max_payload(&self) -> usize {
        self.accept.max_payload as usize
    }

    /// Sends `msg` into the next slot with an arbitrary immediate (tests of the server's
    /// validation: a slot outside the ring, a length beyond the slot).
    pub fn send_with_imm(&mut self, msg: &[u8], imm: u32) -> Result<u32, TransportError> {
        self.copy_in(msg)?;
        self.post_next(msg.len(), Post::Imm(imm))
    }

    /// Copies `msg` into the next send slot (credit and size checked).
    fn copy_in(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        let size = self.usable;
        if msg.len() > size {
            return Err(rdma_err(format!(
                "request of {} bytes does not fit the {size}-byte slot (--slot-size)",
                msg.len()
            )));
        }
        self.next_send_slot()?[..msg.len()].copy_from_slice(msg);
        if msg.len() > crate::protocol::HEADER_LEN {
            count_payload_copy();
        }
        Ok(())
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
        if len > self.usable {
            return Err(rdma_err(format!(
                "request of {len} bytes does not fit the {}-byte slot (--slot-size)",
                self.usable
            )));
        }
        self.post_next(len, Post::Auto)
    }

    /// Writes the first `len` bytes of the next slot (credit checked here) to the server:
    /// on the fast path (a plain WRITE, then the slot's completion word) when negotiated
    /// and the request is small, else as WRITE_WITH_IMM.
    fn post_next(&mut self, len: usize, how: Post) -> Result<u32, TransportError> {
        let slot = self.next_slot;
        let imm = match how {
            Post::Imm(imm) => Some(imm),
            Post::Auto if self.fast && len <= FAST_MAX_LEN => None,
            Post::Auto => Some(
                encode_imm(slot, len as u32)
                    .ok_or_else(|| rdma_err(format!("request of {len} bytes is too long")))?,
            ),
        };
        let mut credit = self.take_credit(slot)?;
        let off = credit.offset();
        let remote = self.accept.req_addr + off as u64;
        let generation = next_generation(self.send_gen[slot as usize]);
        match imm {
            Some(imm) => self.ep.post_write_imm(
                WR_SEND | slot as u64,
                SEND_BUF,
                off,
                len,
                remote,
                self.accept.req_rkey,
                imm,
            )?,
            None => {
                // The word right after the request in the send slot (room is kept: the slot
                // takes at most `usable` bytes), and one WRITE of both that ends on the
                // server slot's last 4 bytes: the word is the last thing placed.
                let word = fast_word(generation, len as u32)
                    .ok_or_else(|| rdma_err(format!("request of {len} bytes is too long")))?;
                credit.bytes_mut()[len..len + FAST_WORD_LEN].copy_from_slice(&word.to_le_bytes());
                self.ep.post_write(
                    WR_SEND | slot as u64,
                    SEND_BUF,
                    off,
                    len + FAST_WORD_LEN,
                    remote + (self.usable - len) as u64,
                    self.accept.req_rkey,
                )?
            }
        }
        // Every request counts, whatever its path: the server counts the same.
        self.send_gen[slot as usize] = generation;
        self.in_flight[slot as usize] = Some(credit);
        self.next_slot = (slot + 1) % self.cfg.depth;
        Ok(slot)
    }

    /// The send slot `slot` for the next request: the token `next_send_slot` prepared or a
    /// fresh claim, refused while the slot's previous request is unanswered; its response
    /// slot taken back from a caller it was lent to.
    fn take_credit(&mut self, slot: u32) -> Result<SlotToken, TransportError> {
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
        self.take_back_response(slot)?;
        Ok(credit)
    }

    /// Takes response slot `slot` back from whoever a reply lent it to (it must be given
    /// back before a request may ask the server to write into it again).
    fn take_back_response(&mut self, slot: u32) -> Result<(), TransportError> {
        let i = slot as usize;
        if self.responses.get(i).is_some_and(Option::is_none) {
            self.responses[i] = self.ep.ring(RESP_BUF).claim(slot);
        }
        match self.responses.get(i) {
            Some(Some(_)) => Ok(()),
            _ => Err(rdma_err(format!(
                "no credit: response slot {slot} still holds a reply being forwarded"
            ))),
        }
    }

    /// Sends the message `src` names (a slot of a ring registered in this connection's
    /// protection domain, e.g. a proxy's inbound ring) into the next slot without copying
    /// it: one WRITE whose scatter list points at `src` (on the fast path with this
    /// connection's completion word gathered after it from the send slot), or, where the
    /// ring is in another PD, copied into the send slot first (counted). Returns the slot.
    pub fn send_lent(&mut self, src: Lent<'_>) -> Result<u32, TransportError> {
        let len = src.len;
        if len > self.usable {
            return Err(rdma_err(format!(
                "request of {len} bytes does not fit the {}-byte slot (--slot-size)",
                self.usable
            )));
        }
        if !self.ep.can_post_from(src.token) {
            let dst = self.next_send_slot()?;
            if src.token.copy_out_at(src.at, &mut dst[..len]) != len {
                return Err(rdma_err("lent request outside its slot"));
            }
            count_payload_copy();
            return self.post_next(len, Post::Auto);
        }
        let slot = self.next_slot;
        let mut credit = self.take_credit(slot)?;
        let remote = self.accept.req_addr + credit.offset() as u64;
        let generation = next_generation(self.send_gen[slot as usize]);
        let wr = WR_SEND | slot as u64;
        let rkey = self.accept.req_rkey;
        if self.fast && len <= FAST_MAX_LEN {
            // The message from where it lies, then this connection's word from the send
            // slot's first 4 bytes: the NIC places them in order, the word last, on the
            // server slot's last 4 bytes.
            let word = fast_word(generation, len as u32)
                .ok_or_else(|| rdma_err(format!("request of {len} bytes is too long")))?;
            credit.bytes_mut()[..FAST_WORD_LEN].copy_from_slice(&word.to_le_bytes());
            let parts = [
                src.token
                    .range(src.at, len)
                    .ok_or_else(|| rdma_err("lent request outside its slot"))?,
                credit
                    .range(0, FAST_WORD_LEN)
                    .ok_or_else(|| rdma_err("send slot shorter than a word"))?,
            ];
            self.ep
                .post_write_from(wr, &parts, remote + (self.usable - len) as u64, rkey, None)?;
        } else {
            let imm = encode_imm(slot, len as u32)
                .ok_or_else(|| rdma_err(format!("request of {len} bytes is too long")))?;
            let part = src
                .token
                .range(src.at, len)
                .ok_or_else(|| rdma_err("lent request outside its slot"))?;
            self.ep
                .post_write_from(wr, &[part], remote, rkey, Some(imm))?;
        }
        self.send_gen[slot as usize] = generation;
        self.in_flight[slot as usize] = Some(credit);
        self.next_slot = (slot + 1) % self.cfg.depth;
        Ok(slot)
    }

    /// [`Self::try_recv`], handing the reply out with its response slot (for posting from
    /// it without a copy): the slot is not asked to take another reply until the returned
    /// token is dropped.
    pub fn try_recv_lent(&mut self) -> Result<Option<(u32, LentReply)>, TransportError> {
        let Some((slot, at, len)) = self.poll_reply()? else {
            return Ok(None);
        };
        let token = self
            .responses
            .get_mut(slot as usize)
            .and_then(Option::take)
            .ok_or_else(|| rdma_err("response slot out of range"))?;
        Ok(Some((slot, LentReply { token, at, len })))
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
        let slot = self.next_slot;
        self.in_flight[slot as usize].is_none()
            && (self.responses[slot as usize].is_some() || !self.ep.ring(RESP_BUF).is_claimed(slot))
    }

    /// Requests sent whose reply has not arrived.
    pub fn outstanding(&self) -> usize {
        self.in_flight.iter().filter(|c| c.is_some()).count()
    }

    /// The ring depth (requests this connection may have in flight).
    pub fn depth(&self) -> u32 {
        self.cfg.depth
    }

    /// The largest message `send` takes: the request slot, less the completion word on a
    /// fast-path connection.
    pub fn slot_size(&self) -> usize {
        self.usable
    }

    /// Non-blocking receive for pipelining callers (proxies): one poll of the completion
    /// queue; the reply's slot and bytes if one arrived. Call [`Self::poll_disconnect`] now
    /// and then to notice a server that went away while nothing is in flight.
    pub fn try_recv(&mut self) -> Result<Option<(u32, &[u8])>, TransportError> {
        let Some((slot, at, len)) = self.poll_reply()? else {
            return Ok(None);
        };
        let bytes = self.response(slot, at, len)?;
        Ok(Some((slot, bytes)))
    }

    /// Fails once the server has closed the connection.
    pub fn poll_disconnect(&mut self) -> Result<(), TransportError> {
        self.check_disconnect()
    }

    /// One poll: (slot, len) of a reply, or None when none was waiting. The CQ first (its
    /// send completions are reaped on every poll, so they never pile up whichever path the
    /// replies take), then, on a fast-path connection, the completion word of every slot
    /// with a request in flight.
    /// Replies are (slot, offset in the response slot, length).
    fn poll_reply(&mut self) -> Result<Option<(u32, usize, usize)>, TransportError> {
        if let Some(r) = self.poll_cq_reply()? {
            return Ok(Some(r));
        }
        if self.fast {
            return self.poll_fast_reply();
        }
        Ok(None)
    }

    /// A reply whose completion word has arrived (fast path), if any.
    fn poll_fast_reply(&mut self) -> Result<Option<(u32, usize, usize)>, TransportError> {
        let at = self.resp_slot_size - FAST_WORD_LEN;
        for slot in 0..self.cfg.depth as usize {
            if self.in_flight[slot].is_none() {
                continue;
            }
            let Some(resp) = self.responses[slot].as_mut() else {
                continue;
            };
            let Some(word) = resp.load_u32(at) else {
                return Err(rdma_err(
                    "the response slot's completion word is not aligned",
                ));
            };
            let Some(len) = fast_word_len(word, self.send_gen[slot]) else {
                continue;
            };
            // Zeroed as taken: later replies into this slot that come as WRITE_WITH_IMM
            // leave the word alone, and 255 requests on, when the generation comes round,
            // the old word would match again and an old reply be taken for a new request
            // (seen through rdma_proxy, whose backend rings are 4 deep). The server writes
            // it again only for this slot's next request, which is not sent yet.
            resp.store_u32(at, 0);
            let len = len as usize;
            if len > at {
                return Err(TransportError::ReplyTooLarge { got: len, max: at });
            }
            self.in_flight[slot] = None;
            // The reply ends where its word begins.
            return Ok(Some((slot as u32, at - len, len)));
        }
        Ok(None)
    }

    /// A reply that came as WRITE_WITH_IMM (its receive completion), if any; send
    /// completions are reaped on the way.
    fn poll_cq_reply(&mut self) -> Result<Option<(u32, usize, usize)>, TransportError> {
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
            return Ok(Some((slot, 0, len)));
        }
    }

    /// The `len` bytes at `at` of response slot `slot`, whose reply has arrived: no request
    /// for it is in flight, and none can be sent while the returned slice borrows self.
    fn response(&self, slot: u32, at: usize, len: usize) -> Result<&[u8], TransportError> {
        self.responses
            .get(slot as usize)
            .and_then(Option::as_ref)
            .and_then(|t| t.bytes().get(at..at + len))
            .ok_or_else(|| rdma_err("response slot out of range"))
    }

    /// Waits for the next reply; returns (slot, offset in the response slot, len).
    fn wait_reply(&mut self) -> Result<(u32, usize, usize), TransportError> {
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
                PollMode::Event => {
                    if let Some(r) = self.wait_event(start)? {
                        return Ok(r);
                    }
                }
            }
        }
    }

    /// Event mode's idle step: arm the CQ, poll once more (a completion that arrived before
    /// the arm raises no event: without this re-poll it would be waited for in vain), then
    /// sleep on the completion channel until an event (or a tick, to look at the stop flag,
    /// the deadline and the connection) and acknowledge the events taken.
    fn wait_event(
        &mut self,
        start: Instant,
    ) -> Result<Option<(u32, usize, usize)>, TransportError> {
        self.ep.arm()?;
        if let Some(r) = self.poll_reply()? {
            return Ok(Some(r));
        }
        let left = self.cfg.timeout.saturating_sub(start.elapsed());
        let tick = (left.as_millis() as i32).clamp(1, EVENT_TICK_MS);
        if let Some(w) = self.waiter.as_mut() {
            w.wait(tick)?;
        }
        self.ep.take_events()?;
        self.check_disconnect()?;
        Ok(None)
    }
}

impl ClientTransport for RdmaClient {
    fn send(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        self.copy_in(msg)?;
        self.post_next(msg.len(), Post::Auto).map(|_| ())
    }

    fn recv(&mut self) -> Result<&[u8], TransportError> {
        let (slot, at, len) = self.wait_reply()?;
        self.response(slot, at, len)
    }

    /// Connects again with the same geometry (new rings, new queue pair), retrying with
    /// backoff ([`RECONNECT_FIRST`] doubling to [`RECONNECT_MAX`]) until `within` has passed; the old connection is
    /// dropped once the new one is up.
    fn reconnect(&mut self, within: Duration) -> Result<bool, TransportError> {
        let deadline = Instant::now() + within;
        let mut pause = RECONNECT_FIRST;
        loop {
            match Self::connect_full(
                &self.host,
                self.port,
                self.cfg.clone(),
                self.receives,
                self.pd_share.clone(),
            ) {
                Ok(fresh) => {
                    *self = fresh;
                    return Ok(true);
                }
                Err(e) if Instant::now() + pause >= deadline => return Err(e),
                Err(e) => {
                    log::warn!(
                        "reconnecting to {}:{} failed ({e}); next try in {} ms",
                        self.host,
                        self.port,
                        pause.as_millis()
                    );
                    std::thread::sleep(pause);
                    pause = next_reconnect_pause(pause);
                }
            }
        }
    }
}

impl Drop for RdmaClient {
    fn drop(&mut self) {
        let _ = self.ep.disconnect();
    }
}

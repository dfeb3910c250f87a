//! The ZeroMQ server transport: one ROUTER owned by the receive loop; workers send their
//! replies over per-worker inproc PUSH sockets to a PULL socket the same loop owns (a
//! ZeroMQ socket must stay with one thread), and the loop forwards them to the ROUTER.
//! Every send to a client is non-blocking: a client that does not read gets at most
//! `reply_hwm` replies queued, the rest are dropped and counted against it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use hacserve_ffi::zmq::{poll_readable, Context, Message, Socket, SocketType};

use super::envelope::{Envelope, Received};
use crate::clock::realtime_ns;
use crate::contract::{Counters, InLoop, ReplySink, ServerJob, ServerTransport, TransportError};
use crate::protocol::{header_bytes, ReplyBuffer, HEADER_LEN};
use crate::transport::slow_peers::SlowPeers;

const REPLY_ENDPOINT: &str = "inproc://hacserve-replies";
/// libzmq drops a connection whose peer sends a message above this many times the payload
/// limit; anything between the limit and this gets a typed PayloadTooLarge reply instead.
const HARD_LIMIT_FACTOR: i64 = 4;
/// Replies libzmq may queue per client before further ones are dropped (libzmq's own default
/// high-water mark): a client that stops reading costs at most this many replies of memory
/// and never blocks the receive loop.
pub const DEFAULT_REPLY_HWM: usize = 1000;
/// Inbound read-ahead per client: the receive loop drains it at once, so it only fills when
/// the loop itself is saturated, and then it pushes back on that client's socket alone.
const REQUEST_HWM: i32 = 1000;
/// Worker replies waiting for the receive loop to forward them.
const INPROC_HWM: i32 = 100_000;
/// How long the loop blocks in zmq_poll when idle in block mode (it wakes on any message).
const IDLE_POLL: Duration = Duration::from_millis(100);
/// After a stop: forward worker replies until none arrives for this long.
const FLUSH_QUIET: Duration = Duration::from_millis(200);

/// The frame size above which libzmq drops the connection that sent it, for a peer whose
/// messages carry at most `max_payload` bytes of payload: frames between the two limits still
/// arrive and get a typed `PayloadTooLarge` from whoever validates them.
pub fn hard_message_limit(max_payload: usize) -> i64 {
    (max_payload as i64 + HEADER_LEN as i64) * HARD_LIMIT_FACTOR + (1 << 20)
}

/// A request as received: its envelope and its one message frame.
pub struct ZmqJob {
    envelope: Envelope,
    payload: Message,
    received: u64,
}

impl ServerJob for ZmqJob {
    fn message(&self) -> &[u8] {
        self.payload.as_slice()
    }
    fn received_ns(&self) -> u64 {
        self.received
    }
}

/// A worker's way back to the receive loop.
pub struct ZmqReplySink {
    push: Socket,
}

impl ReplySink<ZmqJob> for ZmqReplySink {
    fn reply(&mut self, mut job: ZmqJob, reply: &[u8]) -> Result<(), TransportError> {
        // The inproc pipe is bounded and drained by the loop, so waiting on it only waits
        // while the loop is busy; the loop's own sends to clients never wait.
        job.envelope.send_ahead(&self.push, true)?;
        self.push.send(reply, 0)?;
        Ok(())
    }
}

/// The server's sockets.
pub struct ZmqServer {
    ctx: Context,
    router: Socket,
    replies: Socket,
    endpoint: String,
    slow_peers: SlowPeers,
    /// In-loop replies are encoded straight into this message and sent without a copy.
    reply: ZmqReply,
    /// Frame buffer for forwarding worker replies.
    scratch: Message,
    /// What the last poll found readable (both, when it did not wait): requests on the
    /// ROUTER, worker replies on the PULL socket.
    requests_ready: bool,
    replies_ready: bool,
}

impl ZmqServer {
    /// Binds `tcp://{addr}:{port}` (port 0 = any free port; see [`Self::endpoint`]). At most
    /// `reply_hwm` replies wait per client; further ones are dropped and counted.
    pub fn bind(
        ctx: &Context,
        addr: &str,
        port: u16,
        max_payload: usize,
        reply_hwm: usize,
    ) -> Result<Self, TransportError> {
        let router = ctx.socket(SocketType::Router)?;
        router.set_router_mandatory(true)?;
        let hwm = reply_hwm.clamp(1, i32::MAX as usize) as i32;
        router.set_sndhwm(hwm)?;
        router.set_rcvhwm(REQUEST_HWM)?;
        router.set_max_msg_size(hard_message_limit(max_payload))?;
        let endpoint = if port == 0 {
            format!("tcp://{addr}:*")
        } else {
            format!("tcp://{addr}:{port}")
        };
        router.bind(&endpoint)?;
        let endpoint = router.last_endpoint()?;
        let replies = ctx.socket(SocketType::Pull)?;
        replies.set_hwm(INPROC_HWM)?;
        replies.bind(REPLY_ENDPOINT)?;
        Ok(ZmqServer {
            ctx: ctx.clone(),
            router,
            replies,
            endpoint,
            slow_peers: SlowPeers::new(hwm as usize),
            reply: ZmqReply(Message::new()),
            scratch: Message::new(),
            requests_ready: true,
            replies_ready: true,
        })
    }

    /// The bound endpoint, e.g. "tcp://0.0.0.0:5555".
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Replies dropped per client that was not reading them; None when there were none.
    pub fn slow_peer_summary(&self) -> Option<String> {
        self.slow_peers.summary(8)
    }

    /// Forwards every worker reply waiting; returns how many.
    fn forward_replies(&mut self, counters: &Counters) -> Result<usize, TransportError> {
        let mut n = 0;
        while forward_reply(
            &self.replies,
            &self.router,
            &mut self.scratch,
            counters,
            &mut self.slow_peers,
        )? {
            n += 1;
        }
        Ok(n)
    }
}

impl ServerTransport for ZmqServer {
    type Job = ZmqJob;
    type Sink = ZmqReplySink;

    fn reply_sink(&mut self) -> Result<ZmqReplySink, TransportError> {
        let push = self.ctx.socket(SocketType::Push)?;
        push.set_hwm(INPROC_HWM)?;
        // A worker's last replies must outlive its socket until shut_down forwards them.
        push.set_linger(2000)?;
        push.connect(REPLY_ENDPOINT)?;
        Ok(ZmqReplySink { push })
    }

    fn idle_wait(&self) -> (u32, Duration) {
        // zmq_poll wakes on the first message: no need to spin before blocking.
        (0, IDLE_POLL)
    }

    fn poll(&mut self, wait: Duration, counters: &Counters) -> Result<usize, TransportError> {
        if !wait.is_zero() {
            match poll_readable([&self.router, &self.replies], wait.as_millis() as i64) {
                Ok([requests, replies]) => {
                    (self.requests_ready, self.replies_ready) = (requests, replies)
                }
                Err(e) if e.interrupted() => return Ok(0),
                Err(e) => return Err(e.into()),
            }
        } else {
            // Non-blocking receives cost no syscall in libzmq most of the time.
            (self.requests_ready, self.replies_ready) = (true, true);
        }
        if self.replies_ready {
            return self.forward_replies(counters);
        }
        Ok(0)
    }

    fn next_request(&mut self, _: &Counters) -> Result<Option<ZmqJob>, TransportError> {
        if !self.requests_ready {
            return Ok(None);
        }
        let mut envelope = Envelope::new();
        let mut payload = Message::new();
        loop {
            match envelope.recv(&self.router, &mut payload)? {
                Received::Message => {
                    return Ok(Some(ZmqJob {
                        envelope,
                        payload,
                        received: realtime_ns(),
                    }))
                }
                Received::Nothing => {
                    self.requests_ready = false;
                    return Ok(None);
                }
                Received::Dropped => continue,
            }
        }
    }

    fn answer<R>(
        &mut self,
        mut job: ZmqJob,
        write: impl FnOnce(&[u8], &mut dyn ReplyBuffer) -> Option<R>,
    ) -> InLoop<R, ZmqJob> {
        let Some(outcome) = write(job.payload.as_slice(), &mut self.reply) else {
            return InLoop::Kept(job);
        };
        // Sending empties the message: keep its header for the accounting.
        let head = header_bytes(self.reply.bytes());
        let sent = job
            .envelope
            .send_msg(&self.router, &mut self.reply.0)
            .map_err(|e| self.slow_peers.failed_send(e, job.envelope.peer(), &head));
        InLoop::Sent {
            outcome,
            head,
            sent,
        }
    }

    fn shut_down(&mut self, counters: &Counters) -> Result<usize, TransportError> {
        // The workers finished the queue before this is called; their last replies may
        // still be on the way through the inproc sockets.
        let mut forwarded = 0;
        loop {
            match poll_readable([&self.replies], FLUSH_QUIET.as_millis() as i64) {
                Ok([false]) => return Ok(forwarded),
                Ok([true]) => {}
                Err(e) if e.interrupted() => continue,
                Err(e) => return Err(e.into()),
            }
            forwarded += self.forward_replies(counters)?;
        }
    }
}

/// Moves one worker reply (envelope + message) from the PULL socket to the ROUTER, without
/// ever blocking: a reply to a client whose queue is full is dropped and counted.
fn forward_reply(
    replies: &Socket,
    router: &Socket,
    frame: &mut Message,
    counters: &Counters,
    slow_peers: &mut SlowPeers,
) -> Result<bool, TransportError> {
    let mut envelope = Envelope::new();
    match envelope.recv(replies, frame)? {
        Received::Nothing => return Ok(false),
        // Cannot happen: the workers echo envelopes the loop accepted.
        Received::Dropped => return Ok(true),
        Received::Message => {}
    }
    let head = header_bytes(frame.as_slice());
    if let Err(e) = envelope.send_msg(router, frame) {
        match slow_peers.failed_send(e, envelope.peer(), &head) {
            TransportError::PeerNotReading => {
                counters.dropped_replies.fetch_add(1, Ordering::Relaxed);
            }
            e => {
                // The client left (EHOSTUNREACH): its reply has nowhere to go.
                counters.transport_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("reply could not be delivered: {e}");
            }
        }
    }
    Ok(true)
}

/// A reply encoded straight into a libzmq message, which is then sent without a copy (the
/// echo of a 150 KB payload is written once instead of three times).
struct ZmqReply(Message);

impl ReplyBuffer for ZmqReply {
    fn prepare(&mut self, len: usize) -> &mut [u8] {
        if self.0.len() != len {
            match Message::with_size(len) {
                Ok(m) => self.0 = m,
                // The only failure is ENOMEM: treat it as Vec does.
                Err(_) => std::alloc::handle_alloc_error(
                    std::alloc::Layout::array::<u8>(len).unwrap_or(std::alloc::Layout::new::<u8>()),
                ),
            }
        }
        self.0.as_mut_slice()
    }
    fn bytes(&self) -> &[u8] {
        self.0.as_slice()
    }
}

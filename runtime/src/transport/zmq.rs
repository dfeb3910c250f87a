//! ZeroMQ transport (TCP). Server: one receive loop owns a ROUTER socket; workers send their
//! replies over per-worker inproc PUSH sockets to a PULL socket the same loop owns, because a
//! ZeroMQ socket must stay with one thread. Client: a DEALER socket, one request in flight.
//!
//! Messages are one frame each (header + payload). Everything before the last frame is the
//! routing envelope and is echoed back unchanged, so REQ clients and brokers (zmq_balancer)
//! in between work without the server knowing about them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hacserve_ffi::signal;
use hacserve_ffi::zmq::{
    Context, Message, PollSet, PollTarget, Socket, SocketType, DONTWAIT, SNDMORE,
};

use super::slow_peers::SlowPeers;
use super::{ClientTransport, ReplySink, ServerJob, TransportError};
use crate::clock::realtime_ns;
use crate::pipeline::{answer_without_engine, Triage};
use crate::protocol::{Header, ReplyBuffer, FLAG_PRIORITY, HEADER_LEN};
use crate::server::{
    account, overloaded_reply, PollMode, ServerOptions, ServerRecord, WorkQueue, WorkerProbe,
};

/// Routing frames kept per request (a client identity, a REQ delimiter, a broker hop...).
pub const MAX_ENVELOPE: usize = 6;
const REPLY_ENDPOINT: &str = "inproc://hacserve-replies";
/// libzmq drops a connection whose peer sends a message above this many times the payload
/// limit; anything between the limit and this gets a typed PayloadTooLarge reply instead.
const HARD_LIMIT_FACTOR: i64 = 4;
/// Replies libzmq may queue per client before further ones are dropped (libzmq's own default
/// high-water mark): a client that stops reading costs at most this many replies of memory
/// and never blocks the receive loop.
pub const DEFAULT_REPLY_HWM: usize = 1000;

/// A request as received: its envelope and its one message frame.
pub struct ZmqJob {
    envelope: [Message; MAX_ENVELOPE],
    envelope_len: usize,
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
        for frame in &mut job.envelope[..job.envelope_len] {
            self.push.send_msg(frame, SNDMORE)?;
        }
        self.push.send(reply, 0)?;
        Ok(())
    }
}

/// The server's receive loop and its sockets.
pub struct ZmqServer {
    ctx: Context,
    router: Socket,
    replies: Socket,
    endpoint: String,
    reply_hwm: usize,
    slow_peers: SlowPeers,
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
        // Read-ahead per client: the receive loop drains it at once, so it only fills when
        // the loop itself is saturated, and then it pushes back on that client's socket.
        router.set_rcvhwm(DEFAULT_REPLY_HWM as i32)?;
        let hard = (max_payload as i64 + HEADER_LEN as i64) * HARD_LIMIT_FACTOR + (1 << 20);
        router.set_max_msg_size(hard)?;
        let endpoint = if port == 0 {
            format!("tcp://{addr}:*")
        } else {
            format!("tcp://{addr}:{port}")
        };
        router.bind(&endpoint)?;
        let endpoint = router.last_endpoint()?;
        let replies = ctx.socket(SocketType::Pull)?;
        replies.set_hwm(100_000)?;
        replies.bind(REPLY_ENDPOINT)?;
        Ok(ZmqServer {
            ctx: ctx.clone(),
            router,
            replies,
            endpoint,
            reply_hwm: hwm as usize,
            slow_peers: SlowPeers::new(),
        })
    }

    /// Replies dropped per client that was not reading them; None when there were none.
    pub fn slow_peer_summary(&self) -> Option<String> {
        self.slow_peers.summary(8)
    }

    /// The bound endpoint, e.g. "tcp://0.0.0.0:5555".
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A reply sink for one worker (call once per worker, before [`Self::run`]).
    pub fn reply_sink(&self) -> Result<ZmqReplySink, TransportError> {
        let push = self.ctx.socket(SocketType::Push)?;
        push.set_hwm(100_000)?;
        // A worker's last replies must outlive its socket until flush_replies forwards them.
        push.set_linger(2000)?;
        push.connect(REPLY_ENDPOINT)?;
        Ok(ZmqReplySink { push })
    }

    /// After a stop: forwards the replies the workers produced for requests already accepted
    /// (they finish the queue before exiting), until none arrives for `quiet`.
    pub fn flush_replies(
        &mut self,
        queue: &WorkQueue<ZmqJob>,
        quiet: Duration,
    ) -> Result<usize, TransportError> {
        let mut frame = Message::new();
        let mut forwarded = 0;
        let mut poll = PollSet::new(&[PollTarget::Socket(&self.replies)]);
        loop {
            match poll.poll(quiet.as_millis() as i64) {
                Ok(0) => return Ok(forwarded),
                Ok(_) => {}
                Err(e) if e.interrupted() => continue,
                Err(e) => return Err(e.into()),
            }
            while forward_reply(
                &self.replies,
                &self.router,
                &mut frame,
                queue,
                &mut self.slow_peers,
                self.reply_hwm,
            )? {
                forwarded += 1;
            }
        }
    }

    /// Receives requests until a stop is requested: answers rejections and echoes at once,
    /// queues the rest for the workers, and forwards the workers' replies. Returns its own
    /// per-request records (those it answered itself), tagged with worker id `u32::MAX`.
    pub fn run(
        &mut self,
        queue: &WorkQueue<ZmqJob>,
        opts: &ServerOptions,
        probe: &WorkerProbe,
    ) -> Result<Vec<ServerRecord>, TransportError> {
        let mode = opts.poll_mode;
        let mut scratch = Message::new();
        let mut error_reply = Vec::with_capacity(HEADER_LEN + 256);
        let mut reply = ZmqReply(Message::new());
        let mut reply_head = [0u8; HEADER_LEN];
        let mut error_text = String::with_capacity(256);
        let mut log = Vec::with_capacity(if opts.log_folder.is_some() {
            opts.log_capacity
        } else {
            0
        });
        let mut poll = PollSet::new(&[
            PollTarget::Socket(&self.router),
            PollTarget::Socket(&self.replies),
        ]);
        while !signal::stop_requested() {
            let (requests_ready, replies_ready) = match mode {
                // Non-blocking receives cost no syscall in libzmq most of the time.
                PollMode::Busy => (true, true),
                PollMode::Block => match poll.poll(100) {
                    Ok(_) => (poll.readable(0), poll.readable(1)),
                    Err(e) if e.interrupted() => continue,
                    Err(e) => return Err(e.into()),
                },
            };
            if replies_ready {
                while forward_reply(
                    &self.replies,
                    &self.router,
                    &mut scratch,
                    queue,
                    &mut self.slow_peers,
                    self.reply_hwm,
                )? {}
            }
            if requests_ready {
                while let Some(mut job) = receive_request(&self.router, &mut scratch)? {
                    queue.counters.received.fetch_add(1, Ordering::Relaxed);
                    let msg = job.payload.as_slice();
                    let triage = answer_without_engine(
                        msg,
                        job.received,
                        opts.max_payload,
                        &mut reply,
                        &mut error_text,
                    );
                    if let Triage::Answered(outcome) = triage {
                        // Sending empties the message: keep its header for the accounting.
                        reply_head.copy_from_slice(&reply.bytes()[..HEADER_LEN]);
                        let sent = send_msg_with_envelope(&self.router, &mut job, &mut reply.0)
                            .map_err(|e| {
                                note_failed_send(
                                    e,
                                    &job,
                                    &reply_head,
                                    &mut self.slow_peers,
                                    self.reply_hwm,
                                )
                            });
                        account(
                            &queue.counters,
                            probe,
                            &mut log,
                            u32::MAX,
                            &reply_head,
                            job.received,
                            outcome,
                            &error_text,
                            sent,
                            opts.debug,
                            "receive loop",
                        );
                        continue;
                    }
                    let priority = opts.priority_clients
                        && msg.len() >= HEADER_LEN
                        && u32::from_le_bytes([msg[28], msg[29], msg[30], msg[31]]) & FLAG_PRIORITY
                            != 0;
                    if let Err(mut job) = queue.push(job, priority) {
                        queue.counters.overloaded.fetch_add(1, Ordering::Relaxed);
                        overloaded_reply(job.payload.as_slice(), &mut error_reply);
                        log::warn!("queue full: answering Overloaded");
                        if let Err(e) = send_with_envelope(&self.router, &mut job, &error_reply) {
                            match note_failed_send(
                                e,
                                &job,
                                &error_reply,
                                &mut self.slow_peers,
                                self.reply_hwm,
                            ) {
                                TransportError::PeerNotReading => queue
                                    .counters
                                    .dropped_replies
                                    .fetch_add(1, Ordering::Relaxed),
                                e => {
                                    log::warn!("Overloaded reply could not be delivered: {e}");
                                    queue
                                        .counters
                                        .transport_errors
                                        .fetch_add(1, Ordering::Relaxed)
                                }
                            };
                        }
                    }
                }
            }
            if mode == PollMode::Busy {
                std::hint::spin_loop();
            }
        }
        Ok(log)
    }
}

/// Turns a failed reply send into its typed error; a full per-peer queue (EAGAIN) is
/// recorded against that peer.
fn note_failed_send(
    e: TransportError,
    job: &ZmqJob,
    reply_head: &[u8],
    slow_peers: &mut SlowPeers,
    reply_hwm: usize,
) -> TransportError {
    match e {
        TransportError::Zmq(z) if z.would_block() => {
            let peer = job.envelope[..job.envelope_len]
                .first()
                .map_or(&[][..], Message::as_slice);
            let (client, _) = Header::salvage_ids(reply_head);
            slow_peers.record(peer, client, reply_hwm);
            TransportError::PeerNotReading
        }
        e => e,
    }
}

/// One whole request from the ROUTER, or None if none is waiting.
fn receive_request(
    router: &Socket,
    scratch: &mut Message,
) -> Result<Option<ZmqJob>, TransportError> {
    let mut job = ZmqJob {
        envelope: Default::default(),
        envelope_len: 0,
        payload: Message::new(),
        received: 0,
    };
    match router.recv_msg(&mut job.payload, DONTWAIT) {
        Ok(mut more) => {
            while more {
                if job.envelope_len == MAX_ENVELOPE {
                    router.drain_more(scratch)?;
                    log::error!("request with more than {MAX_ENVELOPE} routing frames dropped: it cannot be routed back");
                    return Ok(None);
                }
                job.envelope[job.envelope_len] = job.payload.take();
                job.envelope_len += 1;
                more = router.recv_msg(&mut job.payload, 0)?;
            }
            job.received = realtime_ns();
            Ok(Some(job))
        }
        Err(e) if e.would_block() || e.interrupted() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Moves one worker reply (envelope + message) from the PULL socket to the ROUTER, without
/// ever blocking: a reply to a client whose queue is full is dropped and counted.
fn forward_reply(
    replies: &Socket,
    router: &Socket,
    frame: &mut Message,
    queue: &WorkQueue<ZmqJob>,
    slow_peers: &mut SlowPeers,
    reply_hwm: usize,
) -> Result<bool, TransportError> {
    match replies.recv_msg(frame, DONTWAIT) {
        Ok(mut more) => {
            let mut failed = None;
            let mut first = true;
            loop {
                if failed.is_none() {
                    // Only the routing-id frame can fail (a full or unknown peer); once it is
                    // accepted libzmq takes the rest of the message.
                    let flags = if more { SNDMORE } else { 0 } | if first { DONTWAIT } else { 0 };
                    if let Err(e) = router.send_msg(frame, flags) {
                        let peer = if first {
                            frame.as_slice().to_vec()
                        } else {
                            Vec::new()
                        };
                        failed = Some((e, peer));
                    }
                }
                first = false;
                if !more {
                    break;
                }
                more = replies.recv_msg(frame, 0)?;
            }
            match failed {
                None => {}
                Some((e, peer)) if e.would_block() => {
                    // `frame` now holds the reply itself.
                    let (client, _) = Header::salvage_ids(frame.as_slice());
                    slow_peers.record(&peer, client, reply_hwm);
                    queue
                        .counters
                        .dropped_replies
                        .fetch_add(1, Ordering::Relaxed);
                }
                Some((e, _)) => {
                    // The client left (EHOSTUNREACH): its reply has nowhere to go.
                    queue
                        .counters
                        .transport_errors
                        .fetch_add(1, Ordering::Relaxed);
                    log::warn!("reply could not be delivered: {e}");
                }
            }
            Ok(true)
        }
        Err(e) if e.would_block() || e.interrupted() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Sends the envelope, never blocking: the first (routing-id) frame is sent DONTWAIT, so a
/// client whose reply queue is full fails it with EAGAIN and nothing is sent.
fn send_envelope(router: &Socket, job: &mut ZmqJob) -> Result<(), TransportError> {
    for (i, frame) in job.envelope[..job.envelope_len].iter_mut().enumerate() {
        let flags = SNDMORE | if i == 0 { DONTWAIT } else { 0 };
        router.send_msg(frame, flags)?;
    }
    Ok(())
}

fn send_with_envelope(
    router: &Socket,
    job: &mut ZmqJob,
    body: &[u8],
) -> Result<(), TransportError> {
    send_envelope(router, job)?;
    router.send(body, DONTWAIT)?;
    Ok(())
}

fn send_msg_with_envelope(
    router: &Socket,
    job: &mut ZmqJob,
    body: &mut Message,
) -> Result<(), TransportError> {
    send_envelope(router, job)?;
    router.send_msg(body, DONTWAIT)?;
    Ok(())
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

/// Client end: a DEALER connected to the server (or a balancer/proxy in front of it).
pub struct ZmqClient {
    socket: Socket,
    reply: Message,
    timeout: Duration,
    mode: PollMode,
    max_reply: usize,
}

impl ZmqClient {
    pub fn connect(
        ctx: &Context,
        host: &str,
        port: u16,
        timeout: Duration,
        mode: PollMode,
        max_reply: usize,
    ) -> Result<Self, TransportError> {
        let socket = ctx.socket(SocketType::Dealer)?;
        socket.set_rcvtimeo(timeout.as_millis().min(i32::MAX as u128) as i32)?;
        socket.set_sndtimeo(timeout.as_millis().min(i32::MAX as u128) as i32)?;
        socket.connect(&format!("tcp://{host}:{port}"))?;
        Ok(ZmqClient {
            socket,
            reply: Message::new(),
            timeout,
            mode,
            max_reply,
        })
    }
}

impl ClientTransport for ZmqClient {
    fn send(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        self.socket.send(msg, 0).map_err(|e| {
            if e.would_block() {
                TransportError::Timeout(self.timeout.as_millis() as u64)
            } else {
                e.into()
            }
        })
    }

    fn recv(&mut self) -> Result<&[u8], TransportError> {
        let timeout_ms = self.timeout.as_millis() as u64;
        let more = match self.mode {
            PollMode::Block => self.socket.recv_msg(&mut self.reply, 0).map_err(|e| {
                if e.would_block() {
                    TransportError::Timeout(timeout_ms)
                } else {
                    e.into()
                }
            })?,
            PollMode::Busy => {
                let start = Instant::now();
                loop {
                    match self.socket.recv_msg(&mut self.reply, DONTWAIT) {
                        Ok(more) => break more,
                        Err(e) if e.would_block() => {
                            if start.elapsed() > self.timeout {
                                return Err(TransportError::Timeout(timeout_ms));
                            }
                            if signal::stop_requested() {
                                return Err(TransportError::Stopped);
                            }
                            std::hint::spin_loop();
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        };
        if more {
            self.socket.drain_more(&mut self.reply)?;
            return Err(TransportError::Malformed(
                "reply has more than one frame".into(),
            ));
        }
        let data = self.reply.as_slice();
        if data.len() > self.max_reply {
            return Err(TransportError::ReplyTooLarge {
                got: data.len(),
                max: self.max_reply,
            });
        }
        Ok(data)
    }
}

//! The ZeroMQ client transport: a DEALER connected to the server (or a balancer or proxy in
//! front of it), one request in flight.
//!
//! A server that restarts is reconnected to by libzmq itself; what it had in flight is lost
//! with it. The client watches its connection through a socket monitor, and when the
//! connection was lost while a reply was awaited, sends the request again once the
//! connection is back (a reply to the first copy, if the old server sent one after all, is
//! recognised by its request id and dropped). The request is kept as a libzmq message and
//! sent as a shared reference, so keeping it costs no copy beyond the one `zmq_send` made.

use std::time::{Duration, Instant};

use hacserve_ffi::signal;
use hacserve_ffi::zmq::{
    poll_readable, Context, Message, MonitorEvent, Socket, SocketType, DONTWAIT,
    EVENT_DISCONNECTED, EVENT_HANDSHAKE_SUCCEEDED,
};

use crate::contract::{ClientTransport, PollMode, TransportError};

/// Longest single wait in block mode between looks at the connection's events.
const EVENT_TICK_MS: i64 = 50;
/// Spins between looks at the connection's events in busy mode.
const BUSY_EVENT_SPINS: u32 = 1024;

/// A DEALER connected to the server (or a balancer/proxy in front of it).
pub struct ZmqClient {
    socket: Socket,
    monitor: Socket,
    /// The request in flight, for a resend after a reconnection.
    request: Message,
    reply: Message,
    scratch: Message,
    /// The connection closed while the reply was awaited: resend once it is back.
    lost: bool,
    resends: u64,
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
        socket.set_sndtimeo(timeout.as_millis().min(i32::MAX as u128) as i32)?;
        // A reply far over the limit costs the connection, not a buffer of its size (one
        // moderately over it is still read and reported as ReplyTooLarge).
        let hard = (max_reply as u64).saturating_mul(4).saturating_add(1 << 20);
        socket.set_max_msg_size(hard.min(i64::MAX as u64) as i64)?;
        let monitor = ctx.monitor(&socket, EVENT_HANDSHAKE_SUCCEEDED | EVENT_DISCONNECTED)?;
        socket.connect(&format!("tcp://{host}:{port}"))?;
        Ok(ZmqClient {
            socket,
            monitor,
            request: Message::new(),
            reply: Message::new(),
            scratch: Message::new(),
            lost: false,
            resends: 0,
            timeout,
            mode,
            max_reply,
        })
    }

    /// Requests sent again after the connection was lost and came back.
    pub fn resends(&self) -> u64 {
        self.resends
    }

    /// Looks at the connection's events: a loss marks the request for a resend, the next
    /// handshake resends it.
    fn watch_connection(&mut self) -> Result<(), TransportError> {
        while let Some(ev) = MonitorEvent::read(&self.monitor, &mut self.scratch)? {
            match ev.event {
                EVENT_DISCONNECTED => {
                    log::warn!("connection to the server lost: the request will be sent again");
                    self.lost = true;
                }
                EVENT_HANDSHAKE_SUCCEEDED if self.lost => {
                    self.lost = false;
                    self.resends += 1;
                    let mut copy = self.request.share()?;
                    self.socket.send_msg(&mut copy, 0)?;
                    log::warn!("reconnected: request sent again");
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The request id of the request in flight (bytes 16..24 of its header).
    fn request_id(&self) -> Option<[u8; 8]> {
        self.request.as_slice().get(16..24)?.try_into().ok()
    }
}

impl ClientTransport for ZmqClient {
    fn send(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        // Events since the last request are looked at while this one is awaited: a loss
        // seen then resends this request, which at worst makes a duplicate whose reply the
        // request id filters out.
        self.request = Message::from_slice(msg)?;
        self.lost = false;
        let mut copy = self.request.share()?;
        self.socket.send_msg(&mut copy, 0).map_err(|e| {
            if e.would_block() {
                TransportError::Timeout(self.timeout.as_millis() as u64)
            } else {
                e.into()
            }
        })
    }

    fn recv(&mut self) -> Result<&[u8], TransportError> {
        let timeout_ms = self.timeout.as_millis() as u64;
        let start = Instant::now();
        let want = self.request_id();
        let mut spins = 0u32;
        loop {
            let more = match self.socket.recv_msg(&mut self.reply, DONTWAIT) {
                Ok(more) => more,
                Err(e) if e.would_block() || e.interrupted() => {
                    if start.elapsed() > self.timeout {
                        return Err(TransportError::Timeout(timeout_ms));
                    }
                    if signal::stop_requested() {
                        return Err(TransportError::Stopped);
                    }
                    match self.mode {
                        PollMode::Block | PollMode::Event => {
                            let left = self.timeout.saturating_sub(start.elapsed());
                            let wait = (left.as_millis() as i64).clamp(1, EVENT_TICK_MS);
                            match poll_readable([&self.socket, &self.monitor], wait) {
                                // Only a monitor event needs a look at the connection.
                                Ok([_, false]) => continue,
                                Ok(_) => {}
                                Err(e) if e.interrupted() => {}
                                Err(e) => return Err(e.into()),
                            }
                        }
                        PollMode::Busy => {
                            spins += 1;
                            // Events are rare: look at them now and then, not every spin.
                            if spins % BUSY_EVENT_SPINS != 0 {
                                std::hint::spin_loop();
                                continue;
                            }
                        }
                    }
                    self.watch_connection()?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if more {
                self.socket.drain_more(&mut self.reply)?;
                return Err(TransportError::Malformed(
                    "reply has more than one frame".into(),
                ));
            }
            // After a resend, the first copy's reply may still come: only ours counts.
            let id = self.reply.as_slice().get(16..24);
            if self.resends > 0 && want.is_some() && id != want.as_ref().map(|w| &w[..]) {
                log::debug!("reply to an earlier request dropped");
                continue;
            }
            break;
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

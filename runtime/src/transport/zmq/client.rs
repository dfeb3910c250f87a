//! The ZeroMQ client transport: a DEALER connected to the server (or a balancer or proxy in
//! front of it), one request in flight.

use std::time::{Duration, Instant};

use hacserve_ffi::signal;
use hacserve_ffi::zmq::{Context, Message, Socket, SocketType, DONTWAIT};

use crate::contract::{ClientTransport, PollMode, TransportError};

/// A DEALER connected to the server (or a balancer/proxy in front of it).
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

//! ZeroMQ routing envelopes: the frames before a message's last frame (a ROUTER's peer id,
//! a REQ delimiter, a broker's hops), kept and sent back unchanged so that a reply reaches
//! the peer that asked. The one reader and writer for every role (servers, proxies,
//! balancer), with the same bounds everywhere.

use hacserve_ffi::zmq::{Message, Socket, ZmqError, DONTWAIT, SNDMORE};

/// Routing frames kept per message; a message with more is dropped (it cannot be routed
/// back within the bound).
pub const MAX_ENVELOPE: usize = 7;
/// A routing id is at most 255 bytes (ZMTP 3); a longer routing frame is not one.
pub const MAX_ENVELOPE_FRAME: usize = 255;

/// A message's routing frames.
#[derive(Default)]
pub struct Envelope {
    frames: [Message; MAX_ENVELOPE],
    len: usize,
}

/// What one receive found.
pub enum Received {
    /// A whole message: its envelope went into the [`Envelope`], its last frame into the
    /// body.
    Message,
    /// Nothing waiting.
    Nothing,
    /// A message outside the bounds, discarded whole (logged here); no reply is possible.
    Dropped,
}

impl Envelope {
    pub fn new() -> Self {
        Self::default()
    }

    /// Routing frames held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first routing frame: on a ROUTER, the peer's routing id.
    pub fn peer(&self) -> &[u8] {
        if self.len == 0 {
            &[]
        } else {
            self.frames[0].as_slice()
        }
    }

    /// Receives one multipart message without waiting for its first frame: the routing
    /// frames into `self`, the last frame into `body`. A message with more than
    /// [`MAX_ENVELOPE`] routing frames or a routing frame over [`MAX_ENVELOPE_FRAME`] bytes
    /// is drained and [`Received::Dropped`].
    pub fn recv(&mut self, socket: &Socket, body: &mut Message) -> Result<Received, ZmqError> {
        self.len = 0;
        let mut more = match socket.recv_msg(body, DONTWAIT) {
            Ok(more) => more,
            Err(e) if e.would_block() || e.interrupted() => return Ok(Received::Nothing),
            Err(e) => return Err(e),
        };
        while more {
            let fits = self.len < MAX_ENVELOPE && body.len() <= MAX_ENVELOPE_FRAME;
            if !fits {
                let (frames, longest) = (self.len + 1, body.len());
                socket.drain_more(body)?;
                log::error!(
                    "message dropped: more than {MAX_ENVELOPE} routing frames or one over {MAX_ENVELOPE_FRAME} bytes ({frames}+ frames, one of {longest} B); it cannot be routed back"
                );
                self.len = 0;
                return Ok(Received::Dropped);
            }
            self.frames[self.len] = body.take();
            self.len += 1;
            more = socket.recv_msg(body, 0)?;
        }
        Ok(Received::Message)
    }

    /// Sends the routing frames ahead of a body the caller sends next, consuming them
    /// (zero-copy). Unless `wait`, the first goes without blocking: a ROUTER peer whose queue
    /// is full fails it with EAGAIN (nothing is sent), an unknown peer with EHOSTUNREACH;
    /// once the first frame is taken libzmq takes the rest of the message.
    pub fn send_ahead(&mut self, socket: &Socket, wait: bool) -> Result<(), ZmqError> {
        for (i, frame) in self.frames[..self.len].iter_mut().enumerate() {
            let flags = SNDMORE | if i == 0 && !wait { DONTWAIT } else { 0 };
            socket.send_msg(frame, flags)?;
        }
        Ok(())
    }

    /// Sends the envelope and then `body` as the last frame, without blocking and without
    /// copying `body`.
    pub fn send_msg(&mut self, socket: &Socket, body: &mut Message) -> Result<(), ZmqError> {
        self.send_ahead(socket, false)?;
        socket.send_msg(body, DONTWAIT)
    }

    /// Sends the envelope and then a copy of `body`, without blocking.
    pub fn send(&mut self, socket: &Socket, body: &[u8]) -> Result<(), ZmqError> {
        self.send_ahead(socket, false)?;
        socket.send(body, DONTWAIT)
    }
}

//! The load generator over ZeroMQ: a DEALER socket per connection (the server's ROUTER sees
//! one peer each), libzmq copying each request out of the prepared message.

use hacserve_ffi::zmq::{Context, PollScratch, Socket, SocketType, DONTWAIT};

use super::{LoadLink, Received};
use crate::load::LoadError;

pub struct ZmqLink {
    socket: Socket,
    reply: Vec<u8>,
}

impl ZmqLink {
    /// A DEALER connected to `tcp://host:port` with room for `depth` requests queued and
    /// replies up to `max_reply` bytes.
    pub fn connect(
        ctx: &Context,
        host: &str,
        port: u16,
        depth: usize,
        max_reply: usize,
    ) -> Result<ZmqLink, LoadError> {
        let socket = ctx.socket(SocketType::Dealer)?;
        // Depth bounds what is queued; the HWM must never be what refuses a send.
        socket.set_hwm((depth as i32).saturating_mul(2).max(1000))?;
        socket.set_linger(0)?;
        socket.connect(&format!("tcp://{host}:{port}"))?;
        Ok(ZmqLink {
            socket,
            reply: vec![0; max_reply],
        })
    }
}

impl LoadLink for ZmqLink {
    type Waiter = PollScratch;

    fn waiter(links: &[Self]) -> PollScratch {
        PollScratch::with_capacity(links.len())
    }

    fn try_send(&mut self, _index: usize, message: &[u8]) -> Result<bool, LoadError> {
        match self.socket.send(message, DONTWAIT) {
            Ok(()) => Ok(true),
            Err(e) if e.would_block() || e.interrupted() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn try_recv(&mut self) -> Result<Option<Received<'_>>, LoadError> {
        match self.socket.recv_into(&mut self.reply, DONTWAIT) {
            // libzmq reports the whole message's length and copies what fits.
            Ok((n, _more)) if n > self.reply.len() => Ok(Some(Received::TooLarge)),
            Ok((n, _more)) => Ok(Some(Received::Message(&self.reply[..n]))),
            Err(e) if e.would_block() || e.interrupted() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn wait(
        waiter: &mut PollScratch,
        links: &mut [Self],
        timeout_ms: i64,
    ) -> Result<(), LoadError> {
        match waiter.poll_readable(links.iter().map(|l| &l.socket), timeout_ms) {
            Ok(_) => Ok(()),
            Err(e) if e.interrupted() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn transport() -> &'static str {
        "zmq"
    }
}

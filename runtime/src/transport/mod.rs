//! How request and reply bytes move. A transport is one file here implementing these traits:
//! the server side hands [`ServerJob`]s to the shared worker loop (`server.rs`) and takes the
//! replies back through a [`ReplySink`]; the client side is a [`ClientTransport`] that the
//! closed-loop client (`client.rs`) drives.

pub mod rdma;
pub mod zmq;

use thiserror::Error;

use crate::protocol::HEADER_LEN;

#[derive(Debug, Error)]
pub enum TransportError {
    #[error(transparent)]
    Zmq(#[from] hacserve_ffi::zmq::ZmqError),
    #[error("timed out after {0} ms waiting for a reply")]
    Timeout(u64),
    #[error("reply of {got} bytes does not fit the {max}-byte limit")]
    ReplyTooLarge { got: usize, max: usize },
    #[error("peer sent a malformed message: {0}")]
    Malformed(String),
    #[error("stopped")]
    Stopped,
    #[error(transparent)]
    Rdma(#[from] hacserve_ffi::rdma::RdmaError),
}

/// A received request waiting for a worker: the message bytes plus whatever the transport
/// needs to route the reply (a ZeroMQ envelope, an RDMA connection and slot).
pub trait ServerJob: Send + 'static {
    fn message(&self) -> &[u8];
    /// CLOCK_REALTIME ns when the transport had the whole message.
    fn received_ns(&self) -> u64;
}

/// Sends a worker's reply for a job; one per worker thread, so no locking.
pub trait ReplySink<J> {
    fn reply(&mut self, job: J, reply: &[u8]) -> Result<(), TransportError>;
}

/// The client end of a transport: one request in flight at a time (closed loop).
pub trait ClientTransport {
    fn send(&mut self, msg: &[u8]) -> Result<(), TransportError>;
    /// Receives one whole message and lends it until the next call: the bytes stay where the
    /// transport put them (a libzmq message, an RDMA ring slot), no copy.
    fn recv(&mut self) -> Result<&[u8], TransportError>;
}

/// (client_id, request_id, task) of an encoded message, for logs; zeros if it is too short.
pub fn ids_of(msg: &[u8]) -> (u32, u64, u8) {
    if msg.len() < HEADER_LEN {
        return (0, 0, 0);
    }
    let (c, r) = crate::protocol::Header::salvage_ids(msg);
    (c, r, msg[7])
}

//! What a transport offers: the server side to the serving core ([`ServerTransport`]), the
//! client side to the closed-loop client ([`ClientTransport`]).

use std::time::Duration;

use thiserror::Error;

use super::{Counters, Refusal, ReplySink, ServerJob};
use crate::protocol::{ReplyBuffer, HEADER_LEN};

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
    #[error("the peer is not reading its replies: its reply queue is full, reply dropped")]
    PeerNotReading,
    #[error(transparent)]
    Rdma(#[from] hacserve_ffi::rdma::RdmaError),
    /// The server refused the connection, and said why.
    #[error("the server refused the connection: {0}")]
    Refused(Refusal),
}

/// A reply the receive loop wrote and sent itself, or the job given back untouched.
pub enum InLoop<R, J> {
    Sent {
        /// What the writer returned (the request's outcome).
        outcome: R,
        /// The reply's header bytes, for the accounting.
        head: [u8; HEADER_LEN],
        sent: Result<(), TransportError>,
    },
    Kept(J),
}

/// The server side of a transport, driven by the serving core's receive loop
/// (`server::core`): the transport moves bytes and tracks connections; the core decides
/// what each request gets (validation, engine-free answers, queueing, `Overloaded`),
/// counts it and shuts down. One implementation per transport.
pub trait ServerTransport {
    type Job: ServerJob;
    /// How a worker thread sends its replies.
    type Sink: ReplySink<Self::Job> + Send + 'static;

    /// A reply sink for one worker (called once per worker, before the loop starts).
    fn reply_sink(&mut self) -> Result<Self::Sink, TransportError>;

    /// The receive loop's idle rule in block mode: empty rounds to spin, then the longest
    /// wait per round (see [`super::Backoff`]); the wait is read again every round.
    fn idle_wait(&self) -> (u32, Duration);

    /// One round of everything but taking requests: wait up to `wait` for activity (zero:
    /// do not block), forward replies the workers finished, handle connection events.
    /// Returns how many things it did (0: nothing happened).
    fn poll(&mut self, wait: Duration, counters: &Counters) -> Result<usize, TransportError>;

    /// The next whole request received, never blocking.
    fn next_request(&mut self, counters: &Counters) -> Result<Option<Self::Job>, TransportError>;

    /// Answers `job` from the receive loop without a copy: `write` gets the request bytes
    /// and this job's reply memory, and returns Some(outcome) when it wrote a reply (which
    /// is then sent) or None to leave the job unanswered (it is given back).
    fn answer<R>(
        &mut self,
        job: Self::Job,
        write: impl FnOnce(&[u8], &mut dyn ReplyBuffer) -> Option<R>,
    ) -> InLoop<R, Self::Job>;

    /// Whether the loop should end although no stop was requested (RDMA without
    /// keep-alive: the last client left).
    fn finished(&self) -> bool {
        false
    }

    /// The run's client count its clients declared (the original's `-c/--total-clients`,
    /// sent by RDMA clients at connect), if any: the server's log folder is named after it.
    fn declared_total_clients(&self) -> Option<u32> {
        None
    }

    /// After the loop, once every worker has finished the queue: delivers the replies they
    /// produced, then closes the connections. Returns how many replies it delivered.
    fn shut_down(&mut self, counters: &Counters) -> Result<usize, TransportError>;
}

/// The client end of a transport: one request in flight at a time (closed loop).
pub trait ClientTransport {
    fn send(&mut self, msg: &[u8]) -> Result<(), TransportError>;
    /// Receives one whole message and lends it until the next call: the bytes stay where the
    /// transport put them (a libzmq message, an RDMA ring slot), no copy.
    fn recv(&mut self) -> Result<&[u8], TransportError>;

    /// Sets the connection up again after `lost` ended it (a restarted server), trying
    /// for up to `within`; false when this transport does not (ZeroMQ reconnects by itself,
    /// `lost` says false for its errors).
    fn reconnect(&mut self, _within: Duration) -> Result<bool, TransportError> {
        Ok(false)
    }
}

impl TransportError {
    /// The connection is gone (a fault the peer's restart can cure), as opposed to a slow
    /// peer or a bad message.
    pub fn lost(&self) -> bool {
        matches!(self, TransportError::Rdma(_))
    }
}

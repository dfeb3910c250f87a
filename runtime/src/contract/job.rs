//! A request on the server side: the bytes a transport received ([`ServerJob`]), the same
//! with its header validated once by the serving core ([`Queued`]), and the way a worker's
//! reply goes back ([`ReplySink`]).

use std::sync::Arc;

use hacserve_ffi::gpu::cuda::cu::CudaStream;
use hacserve_ffi::gpu::resident::DeviceSpan;
use hacserve_ffi::rdma::{RegisteredBuf, SlotToken};

use crate::protocol::Header;

use super::TransportError;

/// A received request: the message bytes plus whatever the transport needs to route the
/// reply (a ZeroMQ envelope, an RDMA connection and slot).
pub trait ServerJob: Send + 'static {
    fn message(&self) -> &[u8];
    /// CLOCK_REALTIME ns when the transport had the whole message.
    fn received_ns(&self) -> u64;
    /// The largest payload this request's connection can carry, when the transport bounds
    /// it below the server's limit (RDMA: its slot); None = the server's limit.
    fn payload_limit(&self) -> Option<usize> {
        None
    }
    /// Bytes this job keeps alive while it waits in the work queue, for the queued-bytes
    /// budget: by default its message (ZeroMQ: the libzmq message it owns; RDMA: the part of
    /// its ring slot in use, memory the ring has anyway).
    fn held_bytes(&self) -> usize {
        self.message().len()
    }
    /// A message the transport announced longer than it can hold: why, for the
    /// `PayloadTooLarge` reply. `message` then has only the bytes that fit (enough for the
    /// ids). Only called on that rare path, so it may allocate.
    fn oversize(&self) -> Option<String> {
        None
    }
    /// A request whose payload stayed in GPU memory (a GPUDirect ring slot): `message` then
    /// holds only its header, and this says where the payload lies and where the device
    /// part of its reply goes. None (the default): the payload is in `message`.
    fn resident(&self) -> Option<Resident<'_>> {
        None
    }
    /// A request whose bytes stayed in the registered ring slot they were received in (an
    /// RDMA proxy's zero-copy inbound side): `message` then holds only its header (for the
    /// serving core), and this names the whole message, for a forwarder to post from
    /// directly. None (the default): the message is in `message`.
    fn lent(&self) -> Option<Lent<'_>> {
        None
    }
}

/// A message in a registered ring slot, lent for posting from it: `len` bytes at `at` of
/// the slot `token` holds.
#[derive(Clone, Copy)]
pub struct Lent<'a> {
    pub token: &'a SlotToken<RegisteredBuf>,
    pub at: usize,
    pub len: usize,
}

/// A reply in a registered ring slot (an RDMA proxy's backend response slot), handed over
/// with the slot itself: whoever holds it may post from it, and the slot is not written
/// again (the backend gets no request for it) until this token is dropped.
pub struct LentReply {
    pub token: SlotToken<RegisteredBuf>,
    pub at: usize,
    pub len: usize,
}

impl LentReply {
    /// The reply's bytes (for a sink that copies them).
    pub fn bytes(&self) -> &[u8] {
        self.token
            .bytes()
            .get(self.at..self.at + self.len)
            .unwrap_or(&[])
    }
}

/// Where a GPU-resident request's bytes are: its payload in device memory, the device reply
/// slot the reply body's top-5 part (and logits) is written into for the NIC to send, and
/// the stream of that memory (for the copies the host must see, such as a JPEG's bitstream
/// for nvJPEG's CPU-side Huffman decode).
#[derive(Clone, Copy)]
pub struct Resident<'a> {
    pub payload: DeviceSpan<'a>,
    pub reply: DeviceSpan<'a>,
    pub stream: &'a Arc<CudaStream>,
}

/// A job the serving core accepted for a worker, with the header it decoded and validated
/// (None only where the core forwards requests untouched, as a proxy does).
pub struct Queued<J> {
    pub job: J,
    pub header: Option<Header>,
}

impl<J: ServerJob> Queued<J> {
    pub fn message(&self) -> &[u8] {
        self.job.message()
    }
    pub fn received_ns(&self) -> u64 {
        self.job.received_ns()
    }
}

/// Sends a worker's reply for a job; one per worker thread, so no locking.
pub trait ReplySink<J> {
    fn reply(&mut self, job: J, reply: &[u8]) -> Result<(), TransportError>;
    /// Sends a reply that lies in a registered ring slot: by default copied like any reply
    /// (counted as a payload copy); an RDMA sink whose connection shares the slot's
    /// protection domain posts from the slot without copying.
    fn reply_lent(&mut self, job: J, reply: LentReply) -> Result<(), TransportError> {
        crate::contract::copies::count_payload_copy();
        self.reply(job, reply.bytes())
    }
}

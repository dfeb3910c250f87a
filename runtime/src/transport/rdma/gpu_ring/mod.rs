//! The GPU-resident request ring of one connection (`rdma_server -a 1`), as the server's
//! receive loop and workers see it: [`GpuRingSource`], one trait with two implementations.
//! [`verbs::VerbsGpuRing`] is the real one: a client's RDMA WRITE_WITH_IMM lands in
//! registered GPU memory and the reply goes out as one WRITE_WITH_IMM gathering a host scatter
//! entry (header and timestamps) and a device one (the top-5 or logits the engine wrote on the
//! GPU). [`loopback::LoopbackGpuRing`] stands in for the NIC on a machine without one: device
//! copies put requests where the NIC's DMA would, and read replies from where the NIC would.
//! Everything above the trait (header read, validation, the engine reading the slot, the
//! device reply, the completions) is the same code for both. docs/gpudirect.md has the design.

pub mod loopback;
pub mod verbs;

use std::sync::Arc;

use hacserve_ffi::gpu::cuda::cu::CudaStream;
use hacserve_ffi::gpu::resident::DeviceSpan;
use hacserve_ffi::rdma::{RdmaError, WcStatus, WorkCompletion};

/// Bytes per slot of a connection's device reply ring: the top-5 part (48 B) and up to 2036
/// f32 logits after it (1000 for ImageNet), registered once at connect.
pub const DEVICE_REPLY_SLOT: usize = 8192;

/// One connection's GPU ring: where its requests land (GPU memory), where the device part of
/// its replies is written, and how completions and replies move.
pub trait GpuRingSource: Send + Sync {
    /// Completions since the last call, as a CQ gives them: a receive consumed by a request
    /// (its immediate names the slot and length), or one of our reply writes done.
    fn poll(&self, wcs: &mut [WorkCompletion]) -> Result<usize, RdmaError>;
    /// Gives a receive back for the next request (`wr_id` as the completion named it).
    fn rearm(&self, wr_id: u64) -> Result<(), RdmaError>;
    /// `len` bytes from `offset` of request slot `slot`, in GPU memory.
    fn request(&self, slot: u32, offset: usize, len: usize) -> Option<DeviceSpan<'_>>;
    /// Device reply slot `slot` ([`DEVICE_REPLY_SLOT`] bytes).
    fn reply(&self, slot: u32) -> Option<DeviceSpan<'_>>;
    /// The stream the ring's memory was allocated on (header copies run there).
    fn stream(&self) -> &Arc<CudaStream>;
    /// Writes `host` followed by the first `device_len` bytes of device reply slot `slot`
    /// as one reply to `remote`/`rkey` with immediate `imm`; completes as a send with
    /// `wr_id`. The device slot stays untouched until then (the request's token rule).
    #[allow(clippy::too_many_arguments)]
    fn post_reply(
        &self,
        wr_id: u64,
        slot: u32,
        host: &[u8],
        device_len: usize,
        remote: u64,
        rkey: u32,
        imm: u32,
    ) -> Result<(), RdmaError>;
    fn disconnect(&self) -> Result<(), RdmaError>;
    /// Identifies the connection (the rdma_cm id's handle for verbs).
    fn handle(&self) -> usize;
    /// Largest reply sent inline (0: none).
    fn max_inline(&self) -> usize;
    /// Text of a completion status, for the log.
    fn status_text(&self, status: WcStatus) -> String;
    /// The registration route of the GPU memory, for the log ("DmaBuf", "PeerMem",
    /// "loopback").
    fn route(&self) -> String;
}

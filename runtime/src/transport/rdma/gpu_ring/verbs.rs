//! The GPU ring of a real RDMA connection: the endpoint's GPU buffer [`REQUEST_GPU_BUF`]
//! is the request ring the client writes into, [`REPLY_GPU_BUF`] the device reply ring, and
//! the registered host ring [`STAGE_BUF`](super::super::conn::STAGE_BUF) holds each reply's
//! host part (header and timestamps) for the gathered write.

use std::sync::Arc;

use hacserve_ffi::gpu::cuda::cu::CudaStream;
use hacserve_ffi::gpu::resident::DeviceSpan;
use hacserve_ffi::rdma::{RcEndpoint, RdmaError, WcStatus, WorkCompletion};

use super::{GpuRingSource, DEVICE_REPLY_SLOT};
use crate::transport::rdma::conn::STAGE_BUF;

/// GPU buffers of the endpoint, in registration order.
pub const REQUEST_GPU_BUF: usize = 0;
pub const REPLY_GPU_BUF: usize = 1;

/// A connection's endpoint with its GPU request ring and device reply ring registered.
pub struct VerbsGpuRing {
    ep: RcEndpoint,
    slot_size: usize,
    depth: u32,
    resp_stage_size: usize,
}

impl VerbsGpuRing {
    /// `ep` has the host staging ring as STAGE_BUF (slots of `resp_stage_size`) and GPU
    /// buffers REQUEST_GPU_BUF (`depth` x `slot_size`) and REPLY_GPU_BUF (`depth` x
    /// [`DEVICE_REPLY_SLOT`]).
    pub fn new(ep: RcEndpoint, slot_size: usize, depth: u32, resp_stage_size: usize) -> Self {
        VerbsGpuRing {
            ep,
            slot_size,
            depth,
            resp_stage_size,
        }
    }
}

impl GpuRingSource for VerbsGpuRing {
    fn poll(&self, wcs: &mut [WorkCompletion]) -> Result<usize, RdmaError> {
        self.ep.poll(wcs)
    }

    fn rearm(&self, wr_id: u64) -> Result<(), RdmaError> {
        self.ep.post_recv_empty(wr_id)
    }

    fn request(&self, slot: u32, offset: usize, len: usize) -> Option<DeviceSpan<'_>> {
        if slot >= self.depth || offset.checked_add(len)? > self.slot_size {
            return None;
        }
        self.ep
            .gpu_buf(REQUEST_GPU_BUF)
            .span(slot as usize * self.slot_size + offset, len)
    }

    fn reply(&self, slot: u32) -> Option<DeviceSpan<'_>> {
        if slot >= self.depth {
            return None;
        }
        self.ep
            .gpu_buf(REPLY_GPU_BUF)
            .span(slot as usize * DEVICE_REPLY_SLOT, DEVICE_REPLY_SLOT)
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.ep.gpu_buf(REQUEST_GPU_BUF).stream()
    }

    fn post_reply(
        &self,
        wr_id: u64,
        slot: u32,
        host: &[u8],
        device_len: usize,
        remote: u64,
        rkey: u32,
        imm: u32,
    ) -> Result<(), RdmaError> {
        // The host part goes through the registered staging slot of the same index (only
        // the holder of the request's token stages there; the NIC read its last reply before
        // the client could send this request).
        let mut stage = self
            .ep
            .ring(STAGE_BUF)
            .claim(slot)
            .ok_or_else(|| RdmaError::Other(format!("staging slot {slot} busy")))?;
        let room = stage.bytes_mut();
        if host.len() > room.len() || device_len > DEVICE_REPLY_SLOT {
            return Err(RdmaError::Other(format!(
                "reply of {} + {device_len} B exceeds the {} + {DEVICE_REPLY_SLOT} B slots",
                host.len(),
                self.resp_stage_size
            )));
        }
        room[..host.len()].copy_from_slice(host);
        let host_off = slot as usize * self.resp_stage_size;
        let device_off = slot as usize * DEVICE_REPLY_SLOT;
        self.ep.post_write_imm_gathered(
            wr_id,
            (STAGE_BUF, host_off, host.len()),
            (REPLY_GPU_BUF, device_off, device_len),
            remote,
            rkey,
            imm,
        )
    }

    fn disconnect(&self) -> Result<(), RdmaError> {
        self.ep.disconnect()
    }

    fn handle(&self) -> usize {
        self.ep.handle()
    }

    fn max_inline(&self) -> usize {
        self.ep.max_inline()
    }

    fn status_text(&self, status: WcStatus) -> String {
        self.ep.wc_status_str(status)
    }

    fn route(&self) -> String {
        format!("{:?}", self.ep.gpu_buf(REQUEST_GPU_BUF).route())
    }
}

//! A GPU ring without a NIC, for machines that have a GPU but no RDMA device (and for the
//! GPU test and benchmark): [`LoopbackClient::send`] puts a request into the server's GPU
//! request slot with a host-to-device copy, exactly where and as the NIC's DMA would put a
//! client's WRITE_WITH_IMM, and queues the receive completion the CQ would give; the server's
//! reply is read out of the device reply slot by a device-to-host copy, as the NIC's gather
//! would read it. Those copies stand in for the NIC: the GPU layer counts them apart
//! ([`Mover::NicStandIn`]) from the server's own. The server side, [`LoopbackGpuRing`], is a
//! [`GpuRingSource`] like the verbs one, so the server runs its GPU-ring path unchanged.
//!
//! The client's response ring is one host buffer behind a mutex: the stand-in NIC writes it
//! from the worker thread that posts a reply and the client reads it; the server's own path
//! takes no lock.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hacserve_ffi::gpu::cuda::cu::CudaStream;
use hacserve_ffi::gpu::resident::{DeviceMemory, DeviceSpan, ResidentError};
use hacserve_ffi::gpu::transfer::Mover;
use hacserve_ffi::rdma::{RdmaError, WcStatus, WorkCompletion};

use super::{GpuRingSource, DEVICE_REPLY_SLOT};
use crate::transport::rdma::wire::{decode_imm, encode_imm, response_slot_size};

/// Handles of loopback connections: far above any rdma_cm handle in one process.
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(usize::MAX / 2);

struct Shared {
    /// The ring's stream (server side) and the stand-in NIC's.
    stream: Arc<CudaStream>,
    nic_stream: Arc<CudaStream>,
    requests: DeviceMemory,
    replies: DeviceMemory,
    slot_size: usize,
    depth: u32,
    resp_slot_size: usize,
    /// The server's completion queue and posted receives.
    cq: ArrayQueue<WorkCompletion>,
    receives: ArrayQueue<u64>,
    /// The client's response ring and the replies written into it, (slot, length).
    responses: Mutex<Vec<u8>>,
    delivered: ArrayQueue<(u32, u32)>,
    alive: AtomicBool,
    handle: usize,
}

/// The server's end of a loopback GPU ring.
pub struct LoopbackGpuRing {
    shared: Arc<Shared>,
}

/// The client's end: sends requests into the GPU ring, receives replies.
pub struct LoopbackClient {
    shared: Arc<Shared>,
}

/// Errors of the loopback pair.
#[derive(Debug, thiserror::Error)]
pub enum LoopbackError {
    #[error(transparent)]
    Gpu(#[from] ResidentError),
    #[error("{0}")]
    Ring(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

/// A connected pair over a ring of `depth` slots of `slot_size` bytes in GPU memory on
/// `stream`'s device, and its device reply ring: allocated here, once.
pub fn pair(
    stream: &Arc<CudaStream>,
    depth: u32,
    slot_size: usize,
) -> Result<(LoopbackGpuRing, LoopbackClient), LoopbackError> {
    let nic_stream = stream
        .context()
        .new_stream()
        .map_err(|e| LoopbackError::Gpu(ResidentError::from(e)))?;
    let resp_slot_size = response_slot_size(slot_size as u32) as usize;
    let ring = depth as usize;
    let shared = Arc::new(Shared {
        stream: stream.clone(),
        nic_stream,
        requests: DeviceMemory::new(stream, ring * slot_size)?,
        replies: DeviceMemory::new(stream, ring * DEVICE_REPLY_SLOT)?,
        slot_size,
        depth,
        resp_slot_size,
        cq: ArrayQueue::new(3 * ring + 16),
        receives: ArrayQueue::new(ring + 1),
        responses: Mutex::new(vec![0; ring * resp_slot_size]),
        delivered: ArrayQueue::new(ring + 1),
        alive: AtomicBool::new(true),
        handle: NEXT_HANDLE.fetch_add(1, Ordering::Relaxed),
    });
    Ok((
        LoopbackGpuRing {
            shared: shared.clone(),
        },
        LoopbackClient { shared },
    ))
}

impl LoopbackGpuRing {
    pub fn slot_size(&self) -> usize {
        self.shared.slot_size
    }
    pub fn depth(&self) -> u32 {
        self.shared.depth
    }
    pub fn resp_slot_size(&self) -> usize {
        self.shared.resp_slot_size
    }
}

impl GpuRingSource for LoopbackGpuRing {
    fn poll(&self, wcs: &mut [WorkCompletion]) -> Result<usize, RdmaError> {
        let mut n = 0;
        while n < wcs.len() {
            match self.shared.cq.pop() {
                Some(wc) => {
                    wcs[n] = wc;
                    n += 1;
                }
                None => break,
            }
        }
        Ok(n)
    }

    fn rearm(&self, wr_id: u64) -> Result<(), RdmaError> {
        self.shared
            .receives
            .push(wr_id)
            .map_err(|_| RdmaError::Other("more receives posted than the queue holds".into()))
    }

    fn request(&self, slot: u32, offset: usize, len: usize) -> Option<DeviceSpan<'_>> {
        let s = &self.shared;
        if slot >= s.depth || offset.checked_add(len)? > s.slot_size {
            return None;
        }
        s.requests.span(slot as usize * s.slot_size + offset, len)
    }

    fn reply(&self, slot: u32) -> Option<DeviceSpan<'_>> {
        if slot >= self.shared.depth {
            return None;
        }
        self.shared
            .replies
            .span(slot as usize * DEVICE_REPLY_SLOT, DEVICE_REPLY_SLOT)
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.shared.stream
    }

    fn post_reply(
        &self,
        wr_id: u64,
        slot: u32,
        host: &[u8],
        device_len: usize,
        _remote: u64,
        _rkey: u32,
        imm: u32,
    ) -> Result<(), RdmaError> {
        let s = &self.shared;
        if !s.alive.load(Ordering::Acquire) {
            return Err(RdmaError::Other("loopback client gone".into()));
        }
        let total = host.len() + device_len;
        let (imm_slot, imm_len) = decode_imm(imm);
        if slot >= s.depth
            || total > s.resp_slot_size
            || imm_slot != slot
            || imm_len as usize != total
        {
            return Err(RdmaError::Other(format!(
                "reply of {total} B into slot {slot} (imm {imm:#x}) does not fit the {}-byte response slots",
                s.resp_slot_size
            )));
        }
        let device = self
            .reply(slot)
            .and_then(|r| r.sub(0, device_len))
            .ok_or_else(|| RdmaError::Other(format!("device part of {device_len} B")))?;
        {
            // The stand-in NIC's gather: host part, then the device part read from GPU memory.
            let mut responses = s
                .responses
                .lock()
                .map_err(|_| RdmaError::Other("response ring poisoned".into()))?;
            let at = slot as usize * s.resp_slot_size;
            responses[at..at + host.len()].copy_from_slice(host);
            if device_len > 0 {
                device
                    .copy_to_host(
                        &s.nic_stream,
                        &mut responses[at + host.len()..at + total],
                        Mover::NicStandIn,
                    )
                    .map_err(|e| RdmaError::Other(format!("stand-in NIC read: {e}")))?;
            }
        }
        s.delivered
            .push((slot, total as u32))
            .map_err(|_| RdmaError::Other("client's reply queue full".into()))?;
        s.cq.push(WorkCompletion::stand_in(wr_id, None))
            .map_err(|_| RdmaError::Other("completion queue full".into()))
    }

    fn disconnect(&self) -> Result<(), RdmaError> {
        self.shared.alive.store(false, Ordering::Release);
        Ok(())
    }

    fn handle(&self) -> usize {
        self.shared.handle
    }

    fn max_inline(&self) -> usize {
        0
    }

    fn status_text(&self, status: WcStatus) -> String {
        format!("{status:?}")
    }

    fn route(&self) -> String {
        "loopback (device copies stand in for the NIC)".into()
    }
}

impl LoopbackClient {
    /// Writes `request` (header + payload) into GPU slot `slot` as the NIC's DMA would and
    /// raises the server's receive completion, consuming a posted receive (none posted: the
    /// RNR a real client would retry, reported).
    pub fn send(&self, slot: u32, request: &[u8]) -> Result<(), LoopbackError> {
        let s = &self.shared;
        let imm = encode_imm(slot, request.len() as u32)
            .filter(|_| slot < s.depth && request.len() <= s.slot_size)
            .ok_or_else(|| {
                LoopbackError::Ring(format!(
                    "request of {} B into slot {slot} of {} x {} B",
                    request.len(),
                    s.depth,
                    s.slot_size
                ))
            })?;
        let span = s
            .requests
            .span(slot as usize * s.slot_size, request.len())
            .ok_or_else(|| LoopbackError::Ring("slot outside the ring".into()))?;
        span.copy_from_host(&s.nic_stream, request, Mover::NicStandIn)?;
        let wr_id = s
            .receives
            .pop()
            .ok_or_else(|| LoopbackError::Ring("no receive posted (RNR)".into()))?;
        s.cq.push(WorkCompletion::stand_in(wr_id, Some(imm)))
            .map_err(|_| LoopbackError::Ring("completion queue full".into()))
    }

    /// Waits up to `timeout` for the next reply and copies it into `out`; returns its slot.
    pub fn recv(&self, out: &mut Vec<u8>, timeout: Duration) -> Result<u32, LoopbackError> {
        let s = &self.shared;
        let start = Instant::now();
        loop {
            if let Some((slot, len)) = s.delivered.pop() {
                let responses = s
                    .responses
                    .lock()
                    .map_err(|_| LoopbackError::Ring("response ring poisoned".into()))?;
                let at = slot as usize * s.resp_slot_size;
                out.clear();
                out.extend_from_slice(&responses[at..at + len as usize]);
                return Ok(slot);
            }
            if start.elapsed() > timeout {
                return Err(LoopbackError::Timeout(timeout));
            }
            std::hint::spin_loop();
        }
    }

    /// The client leaves: the server sees its replies fail and retires the connection.
    pub fn close(&self) {
        self.shared.alive.store(false, Ordering::Release);
    }

    pub fn slot_size(&self) -> usize {
        self.shared.slot_size
    }

    pub fn depth(&self) -> u32 {
        self.shared.depth
    }
}

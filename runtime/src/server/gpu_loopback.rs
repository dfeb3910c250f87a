//! rdma_server's GPU-ring path (`-a 1`) on a machine without an RDMA device: an
//! [`RdmaServer`] whose one connection is a loopback GPU ring, with its workers, serving on
//! a thread of its own, and the client end that puts requests into the GPU ring as the NIC
//! would. The receive loop, the header read, the workers, the engine reading the slot and
//! the reply from the device reply slot are the ones `rdma_server -a 1` runs; only the
//! ring source differs ([`crate::transport::rdma::gpu_ring`]). For the GPU test and the
//! benchmark; one per process (its stop is the process-wide stop request).

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hacserve_ffi::gpu::cuda::cu::CudaStream;
use hacserve_ffi::gpu::ops::{GpuDevice, Handles};
use hacserve_ffi::signal;

pub use hacserve_ffi::gpu::transfer::{moved, Transfers};

use super::options::{LoopPolicy, ServerOptions};
use super::threads::ServerThreads;
use crate::contract::PollMode;
use crate::pipeline::Pipeline;
use crate::transport::rdma::gpu_ring::loopback::{self, LoopbackClient, LoopbackError};
use crate::transport::rdma::{Addressing, GpuRing, RdmaServer, RdmaServerConfig};

/// A running loopback GPU-ring server and its client.
pub struct GpuLoopback {
    pub client: LoopbackClient,
    serving: Option<JoinHandle<String>>,
}

impl GpuLoopback {
    /// Serves a ring of `depth` slots of `slot_size` bytes in GPU memory on `stream`'s GPU
    /// (GPU `ordinal`) with one worker per pipeline; returns once it is serving.
    pub fn start(
        pipelines: Vec<Pipeline>,
        stream: &Arc<CudaStream>,
        ordinal: usize,
        depth: u32,
        slot_size: usize,
    ) -> Result<GpuLoopback, String> {
        let (ring, client) = loopback::pair(stream, depth, slot_size).map_err(|e| e.to_string())?;
        let max_payload = pipelines.first().map_or(slot_size, Pipeline::max_payload);
        let opts = ServerOptions {
            workers: pipelines.len(),
            max_payload,
            poll_mode: PollMode::Busy,
            worker_poll_mode: PollMode::Busy,
            queue_depth: 64,
            max_queued_bytes: 1 << 30,
            priority_clients: false,
            priority_workers: 0,
            monitor_interval: Duration::ZERO,
            log_folder: None,
            log_capacity: 0,
            pin_threads: false,
            debug: false,
            policy: LoopPolicy::AnswerWithoutEngine,
            max_queue_delay: Duration::ZERO,
        };
        let cfg = RdmaServerConfig {
            max_slot_size: slot_size as u32,
            max_depth: depth,
            max_connections: 1,
            max_pinned_bytes: u64::MAX,
            peer_timeout: None,
            keep_alive: true,
            addressing: Addressing::Gpu(GpuRing {
                ordinal,
                stream: stream.clone(),
            }),
            fast_path: false,
            events: false,
            host_ring_cuda: None,
        };
        let (ready, started) = mpsc::channel();
        let serving = std::thread::Builder::new()
            .name("gpu-loopback-server".into())
            .spawn(move || {
                let mut server = match RdmaServer::loopback(cfg, ring, 0) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready.send(Err(format!("loopback server: {e}")));
                        return String::new();
                    }
                };
                let mut threads = match ServerThreads::start(&opts, &mut server, pipelines) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = ready.send(Err(format!("server threads: {e}")));
                        return String::new();
                    }
                };
                let _ = ready.send(Ok(()));
                let result = threads.serve(&mut server, &opts);
                if let Err(e) = result.result {
                    log::error!("loopback server: {e}");
                }
                threads.counters_summary()
            })
            .map_err(|e| format!("starting the loopback server: {e}"))?;
        started
            .recv()
            .map_err(|_| "the loopback server thread died".to_string())??;
        Ok(GpuLoopback {
            client,
            serving: Some(serving),
        })
    }

    /// Sends `request` into GPU slot `slot` and waits up to `timeout` for its reply in `out`.
    pub fn round_trip(
        &self,
        slot: u32,
        request: &[u8],
        out: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<(), LoopbackError> {
        self.client.send(slot, request)?;
        let got = self.client.recv(out, timeout)?;
        if got != slot {
            return Err(LoopbackError::Ring(format!(
                "reply came in slot {got}, the request went to slot {slot}"
            )));
        }
        Ok(())
    }

    /// Stops the server (the process-wide stop) and returns its counters line.
    pub fn stop(mut self) -> String {
        signal::request_stop();
        self.client.close();
        self.serving
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// A stream on GPU `ordinal` for the loopback ring's memory.
pub fn ring_stream(ordinal: usize) -> Result<Arc<CudaStream>, String> {
    hacserve_ffi::gpu::cuda::driver(ordinal)
        .and_then(|ctx| Ok(ctx.new_stream()?))
        .map_err(|e| e.to_string())
}

/// The upload a host-ring request costs the engine: `bytes` from page-locked memory into a
/// device buffer on a stream of its own, timed per call (the figure the GPU-resident path
/// avoids).
pub struct UploadProbe {
    handles: Handles,
    pinned: hacserve_ffi::gpu::cuda::cu::PinnedHostSlice<f32>,
    dst: hacserve_ffi::gpu::cuda::cu::CudaSlice<f32>,
    _device: GpuDevice,
}

impl UploadProbe {
    pub fn new(ordinal: usize, bytes: usize) -> Result<UploadProbe, String> {
        let device = GpuDevice::open(ordinal).map_err(|e| e.to_string())?;
        let handles = device.handles().map_err(|e| e.to_string())?;
        let floats = bytes.div_ceil(4);
        let pinned = handles.pinned_zeros(floats).map_err(|e| e.to_string())?;
        let dst = handles.zeros::<f32>(floats).map_err(|e| e.to_string())?;
        Ok(UploadProbe {
            handles,
            pinned,
            dst,
            _device: device,
        })
    }

    /// One upload, waited for.
    pub fn time(&mut self) -> Result<Duration, String> {
        let start = std::time::Instant::now();
        self.handles
            .upload(&self.pinned, &mut self.dst)
            .and_then(|()| self.handles.synchronize())
            .map_err(|e| e.to_string())?;
        Ok(start.elapsed())
    }
}

/// A request copy slot as `rdma_server -a 0` gives a GPU backend: one slot of a copy ring
/// registered with CUDA (as each connection's is, see `RdmaServerConfig::host_ring_cuda`),
/// for timing the host path with uploads that read the request in place.
pub struct RegisteredCopy {
    token: hacserve_ffi::rdma::SlotToken<hacserve_ffi::rdma::HostBuf>,
    registered: bool,
}

impl RegisteredCopy {
    /// `len` bytes on GPU `ordinal`'s driver; registration refused = plain memory (see
    /// [`Self::registered`]).
    pub fn new(ordinal: usize, len: usize) -> Result<RegisteredCopy, String> {
        let ctx = hacserve_ffi::gpu::cuda::driver(ordinal).map_err(|e| e.to_string())?;
        let mut mem = hacserve_ffi::rdma::HostBuf::new(len)
            .ok_or_else(|| format!("allocating {len} B of host memory"))?;
        let registered = mem.register_with_cuda(&ctx).is_ok();
        let ring = hacserve_ffi::rdma::SlotRing::new(mem, len, 1).map_err(|e| e.to_string())?;
        let token = ring
            .claim(0)
            .ok_or_else(|| "the copy slot is taken".to_string())?;
        Ok(RegisteredCopy { token, registered })
    }

    /// Whether the slot's memory is registered with CUDA.
    pub fn registered(&self) -> bool {
        self.registered
    }

    /// The slot.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.token.bytes_mut()
    }
}

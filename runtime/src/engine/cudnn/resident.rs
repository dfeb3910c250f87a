//! GPU-resident requests on a [`CudnnSession`]: the processed task's tensor converted by a
//! kernel that reads the GPUDirect request slot where the NIC wrote it, the raw task's
//! pixels preprocessed from there, and the reply's top-5 part (softmax + top-k on the device)
//! written into the connection's device reply slot, from which the NIC sends it. Host <->
//! device traffic per request: the 4-byte flag of the tensor check, nothing else.

use hacserve_ffi::gpu::resident::{first_non_finite, read_flag, DeviceSpan};
use hacserve_ffi::gpu::transfer::Mover;

use super::images::input_slot;
use super::run_err;
use super::session::CudnnSession;
use crate::engine::{EngineError, ResidentRequests};

fn resident_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Run(format!("GPU-resident request: {e}"))
}

impl CudnnSession {
    /// Queues the layers behind the input already on the device, then the top-5 kernel into
    /// `reply`; does not wait.
    fn run_into_queued(&mut self, reply: DeviceSpan<'_>, logits: bool) -> Result<(), EngineError> {
        let kernels = self
            .resident
            .clone()
            .ok_or_else(|| EngineError::Run("session without the GPU-ring kernels".into()))?;
        self.run_all_layers()?;
        let out = self.logits_buffer()?;
        kernels
            .top5_reply(self.handles.stream(), out, self.num_classes, reply, logits)
            .map_err(resident_err)
    }
}

impl CudnnSession {
    /// The processed task from host memory without a host-side conversion or staging copy:
    /// the f32 LE bytes go to the device as they lie (a DMA straight from them where the
    /// memory is registered with CUDA, as the RDMA host copy rings are; else staged by the
    /// driver), the GPU-ring kernel converts them (flagging non-finite values), the model
    /// runs and the logits come back. Ok(false): this context cannot (no kernels, batch > 1,
    /// or not a whole input's bytes), the caller takes the host path.
    pub(super) fn run_le_tensor(
        &mut self,
        bytes: &[u8],
        logits: &mut [f32],
    ) -> Result<bool, EngineError> {
        let Some(kernels) = self.resident.clone() else {
            return Ok(false);
        };
        if self.batch != 1 || bytes.len() != self.tensor_bytes.len() {
            return Ok(false);
        }
        self.check_logits(logits)?;
        self.handles.bind().map_err(run_err)?;
        let stream = self.handles.stream().clone();
        let n = {
            let CudnnSession {
                staging,
                buffers,
                resident_flag,
                tensor_bytes,
                ..
            } = self;
            let span = DeviceSpan::of(tensor_bytes, &stream, bytes.len())
                .ok_or_else(|| EngineError::Run("tensor byte buffer too small".into()))?;
            span.copy_from_host(&stream, bytes, Mover::Server)
                .map_err(resident_err)?;
            let mut input = input_slot(staging, buffers, 0, 1)?;
            let n = input.len();
            kernels
                .f32_from_le_bytes(&stream, span, &mut input, resident_flag)
                .map_err(resident_err)?;
            n
        };
        self.run_and_download(logits)?;
        let flag = read_flag(&stream, &self.resident_flag).map_err(resident_err)?;
        match first_non_finite(flag, n) {
            Some(i) => Err(EngineError::BadInput(format!(
                "tensor value {i} is not finite"
            ))),
            None => Ok(true),
        }
    }
}

impl ResidentRequests for CudnnSession {
    fn infer_resident_tensor(
        &mut self,
        tensor: DeviceSpan<'_>,
        reply: DeviceSpan<'_>,
        logits: bool,
    ) -> Result<(), EngineError> {
        self.handles.bind().map_err(run_err)?;
        let kernels = self
            .resident
            .clone()
            .ok_or_else(|| EngineError::Run("session without the GPU-ring kernels".into()))?;
        let stream = self.handles.stream().clone();
        let n = {
            let CudnnSession {
                staging,
                buffers,
                resident_flag,
                ..
            } = self;
            let mut input = input_slot(staging, buffers, 0, 1)?;
            let n = input.len();
            kernels
                .f32_from_le_bytes(&stream, tensor, &mut input, resident_flag)
                .map_err(resident_err)?;
            n
        };
        self.run_into_queued(reply, logits)?;
        // One wait for everything queued: the flag comes back after the reply is written.
        let flag = read_flag(&stream, &self.resident_flag).map_err(resident_err)?;
        match first_non_finite(flag, n) {
            Some(i) => Err(EngineError::BadInput(format!(
                "tensor value {i} is not finite"
            ))),
            None => Ok(()),
        }
    }

    fn run_preprocessed_into(
        &mut self,
        reply: DeviceSpan<'_>,
        logits: bool,
    ) -> Result<(), EngineError> {
        self.handles.bind().map_err(run_err)?;
        self.run_into_queued(reply, logits)?;
        self.handles.synchronize().map_err(run_err)
    }

    fn preprocess_resident_bgr(
        &mut self,
        width: usize,
        height: usize,
        pixels: DeviceSpan<'_>,
    ) -> Result<(), EngineError> {
        self.handles.bind().map_err(run_err)?;
        let CudnnSession {
            handles,
            images,
            staging,
            buffers,
            ..
        } = self;
        let images = images.as_ref().ok_or_else(|| {
            EngineError::Run("raw pixels on the GPU need --decode gpu (its kernel)".into())
        })?;
        let mut input = input_slot(staging, buffers, 0, 1)?;
        images.preprocess_bgr_into(handles.stream(), width, height, pixels, &mut input)
    }
}

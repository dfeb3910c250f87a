//! The executor: [`CudnnSession`], one worker's GPU context. It owns a stream with its
//! cuDNN/cuBLAS handles, the layers built from the plan ([`super::layers`]), one device
//! buffer per activation tensor, the conv workspace, and the CUDA graph of all layers
//! captured after a warm-up, so a run allocates nothing. With dynamic batching it also owns
//! a second context planned for `max_batch` images (its own graph), whose slots are filled
//! one request at a time and run together ([`InferenceEngine::run_slots`]).

use std::sync::Arc;

use hacserve_ffi::gpu::cuda::cu;
use hacserve_ffi::gpu::ops::{f16, ConvMath, GpuOpsError, Graph, Handles};
use hacserve_ffi::gpu::resident::ResidentKernels;

use super::images::GpuImages;
use super::layers::{self, Layer, Operands};
use super::plan::Plan;
use super::weights::{padded_channels, DevBuf};
#[cfg(doc)]
use super::CudnnOptions;
use super::{run_err, CudnnLoader, Precision};
use crate::engine::{DeviceImages, EngineError, InferenceEngine, ResidentRequests};

/// One worker's GPU context: its own stream, handles, descriptors and buffers.
pub struct CudnnSession {
    pub(super) handles: Handles,
    pub(super) layers: Vec<Layer>,
    /// One buffer per plan tensor (fused ops write into their conv's buffer).
    pub(super) buffers: Vec<Option<DevBuf>>,
    /// FP16: where `run` uploads the f32 NCHW input (the first layer converts it).
    pub(super) staging: Option<cu::CudaSlice<f32>>,
    /// The host input (page-locked: the upload is an asynchronous DMA).
    pub(super) host_input: cu::PinnedHostSlice<f32>,
    /// nvJPEG + preprocessing kernel, with [`CudnnOptions::gpu_decode`].
    pub(super) images: Option<GpuImages>,
    /// GPU-ring kernels and the flag word of the tensor check (GPU-resident requests).
    pub(super) resident: Option<Arc<ResidentKernels>>,
    pub(super) resident_flag: cu::CudaSlice<u32>,
    /// Where the processed task's tensor bytes are uploaded as received (batch-1 contexts
    /// with the GPU-ring kernels; else one byte), for the f32 conversion on the device.
    pub(super) tensor_bytes: cu::CudaSlice<u8>,
    /// Dynamic batching: the batch-`max_batch` context JPEGs are staged into, and where its
    /// logits land before the first `n` images' are handed out.
    pub(super) batched: Option<Box<CudnnSession>>,
    /// Smaller batch contexts (preferred batch sizes, ascending), and which context the
    /// device slots were last staged into (None: `batched`).
    pub(super) preferred: Vec<CudnnSession>,
    pub(super) staged_in: Option<usize>,
    pub(super) batch_logits: Vec<f32>,
    /// Slots of the batch input (the batch context's, or this context's) filled on the host
    /// ([`InferenceEngine::slot_input_mut`]) and on the device
    /// ([`DeviceImages::preprocess_slot`]) since the last [`InferenceEngine::run_slots`],
    /// one bit each (`--max-batch` is at most 64).
    pub(super) host_slots: u64,
    pub(super) device_slots: u64,
    pub(super) high_priority: bool,
    /// z for convs without a residual (weighted by 0, kept finite).
    pub(super) zeros: DevBuf,
    pub(super) workspace: cu::CudaSlice<u8>,
    pub(super) weights: Arc<Vec<DevBuf>>,
    pub(super) input_shape: [usize; 4],
    pub(super) output: usize,
    pub(super) num_classes: usize,
    pub(super) batch: usize,
    pub(super) graph: Option<Graph>,
}

impl CudnnSession {
    pub(super) fn new(loader: &CudnnLoader, high_priority: bool) -> Result<Self, EngineError> {
        let mut session = Self::build(loader, &loader.plan, high_priority, true)?;
        if let Some(plan) = &loader.batch_plan {
            let batched = Self::build(loader, plan, high_priority, false)?;
            session.batch_logits = vec![0.0; batched.batch * batched.num_classes];
            session.batched = Some(Box::new(batched));
            for plan in &loader.preferred_plans {
                let ctx = Self::build(loader, plan, high_priority, false)?;
                session.preferred.push(ctx);
            }
        }
        Ok(session)
    }

    /// One context for `plan` (the loader's, or its batch plan); `with_images` gives it the
    /// GPU decoder when the loader has one.
    fn build(
        loader: &CudnnLoader,
        plan: &Plan,
        high_priority: bool,
        with_images: bool,
    ) -> Result<Self, EngineError> {
        let handles = loader
            .device
            .handles_with_priority(high_priority)
            .map_err(run_err)?;
        let math = match loader.options.precision {
            Precision::Fp32 => ConvMath::Fp32,
            Precision::Tf32 => ConvMath::Tf32,
            Precision::Fp16 => ConvMath::Fp16,
        };
        let half = loader.half.clone();
        let fp16 = half.is_some();
        // Element count of each tensor's buffer (FP16: tensor 0 has padded channels).
        let mut sizes: Vec<usize> = plan.shapes.iter().map(|s| s.iter().product()).collect();
        let mut layers = Vec::with_capacity(plan.steps.len() + 1);
        let mut staging = None;
        if let Some(kernels) = &half {
            let dims = plan.shapes[0];
            let cp = padded_channels(dims[1]);
            sizes[0] = dims[0] * cp * dims[2] * dims[3];
            staging = Some(
                handles
                    .zeros::<f32>(dims.iter().product())
                    .map_err(run_err)?,
            );
            layers.push(Layer::ToHalf {
                kernels: kernels.clone(),
                dims,
                cp,
                y: 0,
            });
        }
        let mut f32_tensors = vec![!fp16; plan.shapes.len()];
        let mut workspace = 0usize;
        for step in &plan.steps {
            layers.push(layers::layer_for(
                step,
                plan,
                &handles,
                math,
                &half,
                &mut f32_tensors,
                &mut workspace,
            )?);
        }
        let buffers = sizes
            .iter()
            .zip(&f32_tensors)
            .map(|(&len, &is_f32)| {
                if is_f32 {
                    handles.zeros::<f32>(len).map(|b| Some(DevBuf::F32(b)))
                } else {
                    handles.zeros::<f16>(len).map(|b| Some(DevBuf::F16(b)))
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(run_err)?;
        let largest = sizes.iter().copied().max().unwrap_or(1);
        let zeros = if fp16 {
            DevBuf::F16(handles.zeros::<f16>(largest).map_err(run_err)?)
        } else {
            DevBuf::F32(handles.zeros::<f32>(largest).map_err(run_err)?)
        };
        let ws = handles.zeros::<u8>(workspace).map_err(run_err)?;
        let host_input = handles
            .pinned_zeros(plan.input_shape().iter().product())
            .map_err(run_err)?;
        let images = match &loader.images {
            Some(kernels) if with_images => Some(GpuImages::new(
                kernels.clone(),
                handles.stream(),
                loader.options.max_batch,
                loader.options.hardware_decode,
            )?),
            _ => None,
        };
        let resident_flag = handles.zeros::<u32>(1).map_err(run_err)?;
        let tensor_len = if loader.resident.is_some() && plan.input_shape()[0] == 1 {
            4 * plan.input_shape().iter().product::<usize>()
        } else {
            1
        };
        let tensor_bytes = handles.zeros::<u8>(tensor_len).map_err(run_err)?;
        let mut session = CudnnSession {
            handles,
            layers,
            buffers,
            staging,
            host_input,
            images,
            resident: loader.resident.clone(),
            resident_flag,
            tensor_bytes,
            batched: None,
            preferred: Vec::new(),
            staged_in: None,
            batch_logits: Vec::new(),
            host_slots: 0,
            device_slots: 0,
            high_priority,
            zeros,
            workspace: ws,
            weights: loader.weights.clone(),
            input_shape: plan.input_shape(),
            output: plan.output,
            num_classes: plan.num_classes(),
            batch: plan.input_shape()[0],
            graph: None,
        };
        session.warm_up()?;
        if loader.options.cuda_graph {
            session.tune(loader)?;
            session.graph = session.capture();
        }
        Ok(session)
    }

    /// The measured algorithm choice ([`Self::tune_convs`]): made by the loader's first
    /// session of this batch size, reused by the others (same plan, same GPU).
    fn tune(&mut self, loader: &CudnnLoader) -> Result<(), EngineError> {
        let mut tuned = loader
            .tuned
            .lock()
            .map_err(|_| EngineError::Run("tuning cache poisoned".into()))?;
        if let Some(choice) = tuned.get(&self.batch) {
            return self.apply_tuned(choice);
        }
        let report = match self.tune_convs() {
            Ok(report) => report,
            Err(e) => {
                // The heuristics' algorithms (or those chosen before the failure) stay: each
                // is one cuDNN accepted for this layer.
                log::warn!("cudnn-gpu: batch {}: measured algorithm choice failed ({e}), keeping the heuristics'", self.batch);
                return Ok(());
            }
        };
        let changed: Vec<_> = report.iter().filter(|t| t.chosen != t.heuristic).collect();
        let before: f64 = report.iter().map(|t| t.heuristic_us).sum();
        let after: f64 = report.iter().map(|t| t.chosen_us).sum();
        log::info!(
            "cudnn-gpu: batch {}: measured algorithm choice changed {} of {} convs \
             (sum of their device times {before:.1} -> {after:.1} us)",
            self.batch,
            changed.len(),
            report.len()
        );
        for t in &changed {
            log::debug!(
                "cudnn-gpu: layer {} {:?} {:.2} us -> {:?} {:.2} us",
                t.layer,
                t.heuristic,
                t.heuristic_us,
                t.chosen,
                t.chosen_us
            );
        }
        tuned.insert(
            self.batch,
            report.iter().map(|t| (t.layer, t.chosen)).collect(),
        );
        Ok(())
    }

    /// Captures every layer into a CUDA graph (after the warm-up, so algorithms and buffers
    /// are final); None, with a warning, where the capture fails.
    fn capture(&mut self) -> Option<Graph> {
        if let Err(e) = self.handles.begin_capture() {
            log::warn!("cudnn-gpu: cannot start CUDA graph capture ({e}), running eagerly");
            return None;
        }
        let mut failed = None;
        for i in 0..self.layers.len() {
            if let Err(e) = self.run_layer(i) {
                failed = Some(self.layer_err(i, e));
                break;
            }
        }
        let graph = self.handles.end_capture();
        match (failed, graph) {
            (None, Ok(Some(graph))) => Some(graph),
            (failed, graph) => {
                log::warn!(
                    "cudnn-gpu: CUDA graph capture failed (launch: {failed:?}, end: {:?}), \
                     running eagerly",
                    graph.err()
                );
                None
            }
        }
    }

    /// Whether `infer` replays a CUDA graph.
    pub fn uses_cuda_graph(&self) -> bool {
        self.graph.is_some()
    }

    /// Queues all layers: one graph replay, or one launch per layer.
    fn run_all(&mut self) -> Result<(), EngineError> {
        if let Some(graph) = self.graph.as_mut() {
            return self.handles.replay(graph).map_err(run_err);
        }
        for i in 0..self.layers.len() {
            self.run_layer(i).map_err(|e| self.layer_err(i, e))?;
        }
        Ok(())
    }

    /// One run on zeros: surfaces launch errors at start, and where cuDNN refuses the chosen
    /// algorithm for the fused call (NOT_SUPPORTED), falls back to IMPLICIT_PRECOMP_GEMM.
    fn warm_up(&mut self) -> Result<(), EngineError> {
        for i in 0..self.layers.len() {
            match self.run_layer(i) {
                Ok(()) => {}
                // NOT_SUPPORTED is what the docs promise for an algorithm the fused call lacks;
                // any other cuDNN status gets the same single retry on the always-supported one.
                Err(e) if e.is_cudnn() && self.conv_can_fall_back(i) => {
                    let need = match &mut self.layers[i] {
                        Layer::Conv { op, name, .. } => {
                            log::warn!(
                                "cudnn-gpu: conv {name}: {:?} not supported for the fused call, \
                                 using IMPLICIT_PRECOMP_GEMM",
                                op.algorithm()
                            );
                            op.fall_back(&self.handles).map_err(run_err)?
                        }
                        _ => return Err(run_err(e)),
                    };
                    if need > self.workspace.len() {
                        self.workspace = self.handles.zeros::<u8>(need).map_err(run_err)?;
                    }
                    self.run_layer(i).map_err(|e| self.layer_err(i, e))?;
                }
                Err(e) => return Err(self.layer_err(i, e)),
            }
        }
        self.handles.synchronize().map_err(run_err)
    }

    fn conv_can_fall_back(&self, i: usize) -> bool {
        self.layers[i].can_fall_back()
    }

    /// (conv node name, cuDNN algorithm, activation, workspace bytes) per conv, for logs.
    pub fn conv_algorithms(&self) -> Vec<(String, String, &'static str, usize)> {
        self.layers.iter().filter_map(Layer::conv_info).collect()
    }

    fn layer_err(&self, i: usize, e: GpuOpsError) -> EngineError {
        EngineError::Run(format!("layer {i} {}: {e}", self.layers[i].describe()))
    }

    fn take(&mut self, t: usize) -> Result<DevBuf, GpuOpsError> {
        self.buffers
            .get_mut(t)
            .and_then(Option::take)
            .ok_or_else(|| GpuOpsError::Geometry(format!("tensor {t} missing")))
    }

    /// Queues layer `i`: its output buffer is taken out of `buffers` for the launch (so the
    /// inputs can be borrowed at the same time) and put back after.
    pub(super) fn run_layer(&mut self, i: usize) -> Result<(), GpuOpsError> {
        let y = self.layers[i].output();
        let mut out = self.take(y)?;
        let CudnnSession {
            handles,
            layers,
            buffers,
            staging,
            zeros,
            workspace,
            weights,
            ..
        } = self;
        let operands = Operands {
            buffers,
            staging: staging.as_ref(),
            zeros,
            weights,
        };
        let result = layers[i].launch(i, handles, &operands, workspace, &mut out);
        self.buffers[y] = Some(out);
        result
    }

    /// Queues all layers (for callers in this backend that fill the input themselves).
    pub(super) fn run_all_layers(&mut self) -> Result<(), EngineError> {
        self.run_all()
    }

    /// Bytes of the shared conv workspace.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.len()
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Runs every layer on the session stream and waits (for timing the GPU part alone).
    pub fn run_device(&mut self) -> Result<(), EngineError> {
        self.handles.bind().map_err(run_err)?;
        self.run_all()?;
        self.handles.synchronize().map_err(run_err)
    }
}

impl Drop for CudnnSession {
    fn drop(&mut self) {
        // Launches still queued may read the shared weights: let them finish first. The
        // context is made current for the handle and buffer teardown that follows.
        let _ = self.handles.bind();
        let _ = self.handles.synchronize();
    }
}

impl InferenceEngine for CudnnSession {
    fn name(&self) -> &str {
        "cudnn-gpu"
    }

    fn input_shape(&self) -> [usize; 4] {
        self.input_shape
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The pinned host input: `batch` images, NCHW.
    fn input_mut(&mut self) -> Result<&mut [f32], EngineError> {
        self.host_input
            .as_mut_slice()
            .map_err(|e| run_err(e.into()))
    }

    /// Uploads the pinned input (DMA), runs, and downloads `batch * num_classes` logits.
    fn run(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        self.check_logits(logits)?;
        self.handles.bind().map_err(run_err)?;
        self.upload_input()?;
        self.run_and_download(logits)
    }

    /// The tensor bytes uploaded as they are (from registered memory, by DMA in place) and
    /// converted on the device; false where this context cannot (no GPU-ring kernels).
    fn run_tensor_bytes(&mut self, bytes: &[u8], logits: &mut [f32]) -> Result<bool, EngineError> {
        self.run_le_tensor(bytes, logits)
    }

    fn max_batch(&self) -> usize {
        self.batched.as_ref().map_or(1, |b| b.batch)
    }

    /// Slot `slot` of the pinned host input of the context [`run_slots`](Self::run_slots)
    /// runs (the batch context where there is one).
    fn slot_input_mut(&mut self, slot: usize) -> Result<&mut [f32], EngineError> {
        let slots = self.max_batch();
        // One bit per slot in `host_slots`.
        if slot >= slots || slot >= 64 {
            return Err(EngineError::Run(format!(
                "slot {slot} of a batch of {slots}"
            )));
        }
        self.host_slots |= 1 << slot;
        let (host_input, images) = match self.batched.as_deref_mut() {
            Some(batched) => (&mut batched.host_input, batched.batch),
            None => (&mut self.host_input, self.batch),
        };
        let input = host_input.as_mut_slice().map_err(|e| run_err(e.into()))?;
        let per_image = input.len() / images.max(1);
        Ok(&mut input[slot * per_image..(slot + 1) * per_image])
    }

    /// Runs the whole batch context (slots past `n` hold stale images: their logits are
    /// computed and dropped) and hands out the first `n` images' logits. Slots filled on the
    /// host are uploaded first (the whole pinned input, one DMA); a batch is filled either on
    /// the host or on the device, not both (the upload would overwrite device slots).
    fn run_slots(&mut self, n: usize, logits: &mut [f32]) -> Result<(), EngineError> {
        let (host, device) = (self.host_slots, self.device_slots);
        (self.host_slots, self.device_slots) = (0, 0);
        let staged_in = self.staged_in.take();
        if host != 0 && device != 0 {
            return Err(EngineError::Run(
                "a batch mixes host-filled and device-filled slots".into(),
            ));
        }
        // Device slots staged into a preferred (smaller) context run there.
        let context = match staged_in {
            Some(i) if device != 0 => self.preferred.get_mut(i),
            _ => self.batched.as_deref_mut(),
        };
        let Some(batched) = context else {
            return match n {
                1 if host != 0 => self.run(logits),
                1 => self.run_preprocessed(logits),
                _ => Err(EngineError::Run(format!(
                    "a batch of {n} without a batch context"
                ))),
            };
        };
        let classes = batched.num_classes;
        if n == 0 || n > batched.batch || logits.len() != n * classes {
            return Err(EngineError::Run(format!(
                "{n} images / {} logits for a batch of {}",
                logits.len(),
                batched.batch
            )));
        }
        batched.handles.bind().map_err(run_err)?;
        if host != 0 {
            batched.upload_input()?;
        }
        let ran = batched.batch * classes;
        batched.run_and_download(&mut self.batch_logits[..ran])?;
        logits.copy_from_slice(&self.batch_logits[..n * classes]);
        Ok(())
    }

    fn device_images(&mut self) -> Option<&mut dyn DeviceImages> {
        if self.images.is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn resident_requests(&mut self) -> Option<&mut dyn ResidentRequests> {
        if self.resident.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

impl CudnnSession {
    /// The pinned host input to where the first layer reads it (DMA, on the stream): the
    /// FP16 staging buffer, or the FP32 input tensor.
    pub(super) fn upload_input(&mut self) -> Result<(), EngineError> {
        let CudnnSession {
            handles,
            host_input,
            staging,
            buffers,
            ..
        } = self;
        let copied = match staging.as_mut() {
            Some(staging) => handles.upload(&*host_input, staging),
            None => match buffers.first_mut().and_then(Option::as_mut) {
                Some(DevBuf::F32(first)) => handles.upload(&*host_input, first),
                _ => Err(GpuOpsError::Geometry("no f32 input buffer".into())),
            },
        };
        copied.map_err(run_err)
    }

    pub(super) fn check_logits(&self, logits: &[f32]) -> Result<(), EngineError> {
        if logits.len() != self.batch * self.num_classes {
            return Err(EngineError::Run(format!(
                "logits buffer has {} slots, the model produces {}",
                logits.len(),
                self.batch * self.num_classes
            )));
        }
        Ok(())
    }

    /// Queues the layers behind whatever filled the input, then waits for the logits.
    pub(super) fn run_and_download(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        self.run_all()?;
        let out = self.logits_buffer()?;
        self.handles.download(out, logits).map_err(run_err)
    }

    /// The device buffer the model's logits land in.
    pub(super) fn logits_buffer(&self) -> Result<&cu::CudaSlice<f32>, EngineError> {
        self.buffers
            .get(self.output)
            .and_then(Option::as_ref)
            .ok_or_else(|| EngineError::Run("output buffer missing".to_string()))?
            .f32s()
            .map_err(run_err)
    }

    /// Whether this session's stream has the context's highest priority.
    pub fn high_priority(&self) -> bool {
        self.high_priority
    }
}

//! The executor: [`CudnnSession`], one worker's GPU context. It owns a stream with its
//! cuDNN/cuBLAS handles, the layers built from the plan ([`super::layers`]), one device
//! buffer per activation tensor, the conv workspace, and the CUDA graph of all layers
//! captured after a warm-up, so a run allocates nothing. With dynamic batching it also owns
//! a second context planned for `max_batch` images (its own graph), whose slots are filled
//! one request at a time and run together ([`InferenceEngine::run_slots`]).

use std::sync::Arc;

use hacserve_ffi::gpu::cuda::cu;
use hacserve_ffi::gpu::ops::{f16, ConvMath, GpuOpsError, Graph, Handles, HostLanding};
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
    /// Where the batch context's logits are downloaded (page-locked: the download is queued
    /// behind the run without waiting, [`InferenceEngine::launch_slots`]).
    pub(super) batch_logits: Option<HostLanding>,
    /// The run [`InferenceEngine::launch_slots`] started on these contexts and
    /// [`InferenceEngine::finish_slots`] has not collected yet.
    pub(super) launched: Option<Launched>,
    /// `--overlap-batches`: the other set of batch contexts (the fields above from
    /// `batched` on, swapped in by [`InferenceEngine::select_batch_set`]), and which set is
    /// in the fields now.
    pub(super) spare_set: Option<Box<BatchSet>>,
    pub(super) current_set: usize,
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

/// One set of batch contexts: the batch-`max_batch` context, the preferred smaller ones, and
/// what was staged into and launched on them (the [`CudnnSession`] fields of the same names).
pub(super) struct BatchSet {
    batched: Option<Box<CudnnSession>>,
    preferred: Vec<CudnnSession>,
    staged_in: Option<usize>,
    batch_logits: Option<HostLanding>,
    launched: Option<Launched>,
    host_slots: u64,
    device_slots: u64,
}

/// A run started by [`InferenceEngine::launch_slots`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Launched {
    n: usize,
    on: LaunchedOn,
}

#[derive(Debug, Clone, Copy)]
enum LaunchedOn {
    /// The batch context (None) or preferred context i: its graph and the logits' download
    /// are queued on that context's stream.
    Batch(Option<usize>),
    /// No batch context: a batch of one on this context, run (and waited for) at finish,
    /// from the host input (`host`) or the device input.
    Deferred { host: bool },
}

impl CudnnSession {
    pub(super) fn new(loader: &CudnnLoader, high_priority: bool) -> Result<Self, EngineError> {
        let mut session = Self::build(loader, &loader.plan, high_priority, true)?;
        if let Some(plan) = &loader.batch_plan {
            let sets = if loader.options.overlap_batches { 2 } else { 1 };
            for set in 0..sets {
                let batched = Self::build(loader, plan, high_priority, false)?;
                let logits = batched
                    .handles
                    .landing(batched.batch * batched.num_classes)
                    .map_err(run_err)?;
                let mut preferred = Vec::with_capacity(loader.preferred_plans.len());
                for plan in &loader.preferred_plans {
                    preferred.push(Self::build(loader, plan, high_priority, false)?);
                }
                let built = BatchSet {
                    batched: Some(Box::new(batched)),
                    preferred,
                    staged_in: None,
                    batch_logits: Some(logits),
                    launched: None,
                    host_slots: 0,
                    device_slots: 0,
                };
                if set == 0 {
                    session.batched = built.batched;
                    session.preferred = built.preferred;
                    session.batch_logits = built.batch_logits;
                } else {
                    session.spare_set = Some(Box::new(built));
                }
            }
        }
        Ok(session)
    }

    /// Swaps the spare set of batch contexts into the session's fields (and the current
    /// one out): every slot, launch and finish call then works on the other set.
    fn swap_sets(&mut self) {
        if let Some(spare) = self.spare_set.as_deref_mut() {
            std::mem::swap(&mut self.batched, &mut spare.batched);
            std::mem::swap(&mut self.preferred, &mut spare.preferred);
            std::mem::swap(&mut self.staged_in, &mut spare.staged_in);
            std::mem::swap(&mut self.batch_logits, &mut spare.batch_logits);
            std::mem::swap(&mut self.launched, &mut spare.launched);
            std::mem::swap(&mut self.host_slots, &mut spare.host_slots);
            std::mem::swap(&mut self.device_slots, &mut spare.device_slots);
            self.current_set = 1 - self.current_set;
        }
    }

    /// A run launched on the current set and never finished (its finish panicked or was
    /// skipped): waited for and dropped, so nothing is staged into inputs a run still reads.
    fn settle_launched(&mut self) {
        let Some(launched) = self.launched.take() else {
            return;
        };
        if let LaunchedOn::Batch(on) = launched.on {
            let context = match on {
                Some(i) => self.preferred.get(i),
                None => self.batched.as_deref(),
            };
            if let Some(c) = context {
                if let Err(e) = c.handles.bind().and_then(|()| c.handles.synchronize()) {
                    log::warn!("cudnn-gpu: an unfinished batch run failed: {e}");
                }
            }
        }
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
            batch_logits: None,
            launched: None,
            spare_set: None,
            current_set: 0,
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
    /// computed and dropped) and hands out the first `n` images' logits: [`Self::launch_slots`]
    /// then [`Self::finish_slots`].
    fn run_slots(&mut self, n: usize, logits: &mut [f32]) -> Result<(), EngineError> {
        self.launch_slots(n)?;
        self.finish_slots(n, logits)
    }

    fn batch_sets(&self) -> usize {
        1 + usize::from(self.spare_set.is_some())
    }

    fn select_batch_set(&mut self, set: usize) -> Result<(), EngineError> {
        if set >= self.batch_sets() {
            return Err(EngineError::Run(format!(
                "batch set {set} of {}",
                self.batch_sets()
            )));
        }
        if set != self.current_set {
            self.swap_sets();
        }
        Ok(())
    }

    /// Queues the batch context's graph and the download of its logits on that context's
    /// stream and returns. Slots filled on the host are uploaded first (the whole pinned
    /// input, one DMA); a batch is filled either on the host or on the device, not both (the
    /// upload would overwrite device slots). Device slots staged into a preferred (smaller)
    /// context run there.
    fn launch_slots(&mut self, n: usize) -> Result<(), EngineError> {
        self.settle_launched();
        let (host, device) = (self.host_slots, self.device_slots);
        (self.host_slots, self.device_slots) = (0, 0);
        let staged_in = self.staged_in.take();
        if host != 0 && device != 0 {
            return Err(EngineError::Run(
                "a batch mixes host-filled and device-filled slots".into(),
            ));
        }
        let on = match staged_in {
            Some(i) if device != 0 && i < self.preferred.len() => Some(i),
            _ => None,
        };
        let CudnnSession {
            batched,
            preferred,
            batch_logits,
            launched,
            ..
        } = self;
        let context = match on {
            Some(i) => preferred.get_mut(i),
            None => batched.as_deref_mut(),
        };
        let Some(batched) = context else {
            if n != 1 {
                return Err(EngineError::Run(format!(
                    "a batch of {n} without a batch context"
                )));
            }
            *launched = Some(Launched {
                n,
                on: LaunchedOn::Deferred { host: host != 0 },
            });
            return Ok(());
        };
        let classes = batched.num_classes;
        if n == 0 || n > batched.batch {
            return Err(EngineError::Run(format!(
                "{n} images for a batch of {}",
                batched.batch
            )));
        }
        let pinned = batch_logits
            .as_mut()
            .ok_or_else(|| EngineError::Run("no batch logits buffer".into()))?;
        batched.handles.bind().map_err(run_err)?;
        if host != 0 {
            batched.upload_input()?;
        }
        batched.run_all()?;
        let out = batched.logits_buffer()?;
        batched
            .handles
            .download_async(out, batched.batch * classes, pinned)
            .map_err(run_err)?;
        *launched = Some(Launched {
            n,
            on: LaunchedOn::Batch(on),
        });
        Ok(())
    }

    /// Waits for the launched run's logits (the page-locked buffer's event, recorded after
    /// the download) and copies the first `n` images' out.
    fn finish_slots(&mut self, n: usize, logits: &mut [f32]) -> Result<(), EngineError> {
        let Some(launched) = self.launched.take() else {
            return Err(EngineError::Run("no batch run was launched".into()));
        };
        if launched.n != n || logits.len() != n * self.num_classes {
            return Err(EngineError::Run(format!(
                "finishing {n} images / {} logits of a run of {}",
                logits.len(),
                launched.n
            )));
        }
        match launched.on {
            LaunchedOn::Deferred { host: true } => self.run(logits),
            LaunchedOn::Deferred { host: false } => self.run_preprocessed(logits),
            LaunchedOn::Batch(_) => {
                let pinned = self
                    .batch_logits
                    .as_ref()
                    .ok_or_else(|| EngineError::Run("no batch logits buffer".into()))?;
                let ran = pinned.wait(logits.len()).map_err(run_err)?;
                logits.copy_from_slice(ran);
                Ok(())
            }
        }
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

//! Inference engines, layered as tract is: a shared ONNX front end ([`onnx`]), then per
//! backend a loader that prepares the model once per device ([`EngineLoader`]) and the
//! sessions it makes, one per worker ([`InferenceEngine`]). The pipeline only sees the
//! traits; which backend serves is chosen by name in the [`registry`].
//!
//! - [`onnx`]: model file, graph input shape, operator check, attribute/initializer helpers.
//! - [`tract_cpu`]: `--backend cpu`, tract-onnx (parses and optimises the graph itself).
//! - [`cudnn`]: `--backend gpu`, our cuDNN/cuBLAS engine (plan, weights, session, layers,
//!   device images: nvJPEG + the preprocessing kernel).
//! - [`registry`]: the table of backends ([`registry::BACKENDS`]), `--backend` parsing, and
//!   the sessions for the servers.
//!
//! Contracts, in this file: [`InferenceEngine`] (a session), [`DeviceImages`] (decode on
//! the engine's device), [`EngineLoader`] (a prepared model), and the backend contract the
//! registry consumes: [`BackendEntry`] (name, one-line description, how it reads its
//! options) and [`Backend`] (the configured backend: devices, loaders, banner). A backend
//! file imports only these and [`onnx`]; only the registry names the backends.
//!
//! The batch is part of the contract: an engine says how many images one run takes
//! ([`InferenceEngine::max_batch`], 1 by default); the pipeline fills the slots one request
//! at a time, on the host ([`InferenceEngine::slot_input_mut`]) or, for engines that decode
//! on their device, there ([`DeviceImages::preprocess_slot`]), and runs them together
//! ([`InferenceEngine::run_slots`]).

pub mod cudnn;
pub mod onnx;
pub mod registry;
pub mod tract_cpu;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hacserve_ffi::gpu::cuda::cu::CudaStream;
use hacserve_ffi::gpu::resident::DeviceSpan;

use thiserror::Error;

/// Errors of loading or running a model.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("cannot read model file {path}: {source}")]
    ModelFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("model {path} is not usable: {reason}")]
    BadModel { path: String, reason: String },
    #[error("input has {got} values, the model wants {want}")]
    InputSize { got: usize, want: usize },
    #[error("inference failed: {0}")]
    Run(String),
    /// The request's data is at fault (e.g. a JPEG the device decoder rejects), not the engine.
    #[error("{0}")]
    BadInput(String),
}

/// One inference context, owned by one worker thread (not shared: each worker gets its own
/// from [`EngineLoader::session`], so no lock is taken per request).
pub trait InferenceEngine: Send {
    /// Backend name for logs and tables, e.g. "tract-cpu".
    fn name(&self) -> &str;
    /// Input tensor shape, NCHW (batch is 1 for the per-request path).
    fn input_shape(&self) -> [usize; 4];
    /// Number of logits the model produces.
    fn num_classes(&self) -> usize;
    /// The host buffer the next [`run`](Self::run) reads: an NCHW f32 tensor of
    /// `input_shape()`. Callers write the input straight here (the GPU engine keeps it in
    /// page-locked memory, so the upload is an asynchronous DMA without a staging copy).
    fn input_mut(&mut self) -> Result<&mut [f32], EngineError>;
    /// Runs one forward pass on what [`input_mut`](Self::input_mut) holds and writes the raw
    /// logits (before softmax) into `logits`, whose length is `num_classes()` per image.
    fn run(&mut self, logits: &mut [f32]) -> Result<(), EngineError>;
    /// Copies `input` into the input buffer, then [`run`](Self::run)s.
    fn infer(&mut self, input: &[f32], logits: &mut [f32]) -> Result<(), EngineError> {
        let buffer = self.input_mut()?;
        if buffer.len() != input.len() {
            return Err(EngineError::InputSize {
                got: input.len(),
                want: buffer.len(),
            });
        }
        buffer.copy_from_slice(input);
        self.run(logits)
    }
    /// Images one [`run_slots`](Self::run_slots) call takes: the dynamic batch. 1 = none.
    /// The processed task's payload (`bytes`: the whole input as f32 little-endian, as it
    /// arrived) run without first converting it into [`Self::input_mut`]: engines that upload
    /// the bytes as they lie and convert on their device say true; false (the default) =
    /// not this engine, use `input_mut` + `run`. A non-finite value is
    /// [`EngineError::BadInput`] naming its index, as on the host path.
    fn run_tensor_bytes(&mut self, bytes: &[u8], logits: &mut [f32]) -> Result<bool, EngineError> {
        let _ = (bytes, logits);
        Ok(false)
    }

    fn max_batch(&self) -> usize {
        1
    }
    /// The host input of slot `slot` (< `max_batch`) of the batch input: one image, NCHW
    /// f32 of `input_shape()`'s C, H, W. With a batch of 1 it is [`input_mut`](Self::input_mut).
    fn slot_input_mut(&mut self, slot: usize) -> Result<&mut [f32], EngineError> {
        if slot == 0 {
            self.input_mut()
        } else {
            Err(EngineError::Run(format!("slot {slot} of a batch of 1")))
        }
    }
    /// Runs the model once on slots `0..n` (`n <= max_batch`), each filled since the last
    /// run by [`slot_input_mut`](Self::slot_input_mut) or, on engines with device images, by
    /// [`DeviceImages::preprocess_slot`], and writes `n * num_classes` logits, image after
    /// image. With a batch of 1 it is [`run`](Self::run); an engine that has
    /// [`device_images`](Self::device_images) overrides it to run on device-filled slots.
    fn run_slots(&mut self, n: usize, logits: &mut [f32]) -> Result<(), EngineError> {
        if n == 1 {
            self.run(logits)
        } else {
            Err(EngineError::Run(format!(
                "a batch of {n} on an engine of batch 1"
            )))
        }
    }
    /// Batch input sets this engine keeps (1 by default): with 2 (the GPU backend's
    /// `--overlap-batches on`), the pipeline stages the next batch into one set while the
    /// run of the other is still in flight ([`Self::launch_slots`] returns before the run
    /// ends, [`Self::finish_slots`] waits for it). Only engines whose launch really returns
    /// early answer more than 1.
    fn batch_sets(&self) -> usize {
        1
    }
    /// Which batch input set (< [`Self::batch_sets`]) the slot calls, `launch_slots` and
    /// `finish_slots` use from now on. Set 0 is the one in use at start.
    fn select_batch_set(&mut self, set: usize) -> Result<(), EngineError> {
        if set == 0 {
            Ok(())
        } else {
            Err(EngineError::Run(format!("batch set {set} of 1")))
        }
    }
    /// Starts the run of slots `0..n` of the current set (as [`Self::run_slots`]) without
    /// waiting for it; [`Self::finish_slots`] with the same `n` waits and hands out the
    /// logits. The default runs nothing here and everything in `finish_slots`.
    fn launch_slots(&mut self, n: usize) -> Result<(), EngineError> {
        let _ = n;
        Ok(())
    }
    /// Waits for the run [`Self::launch_slots`] started on the current set and writes its
    /// `n * num_classes` logits. The default is [`Self::run_slots`].
    fn finish_slots(&mut self, n: usize, logits: &mut [f32]) -> Result<(), EngineError> {
        self.run_slots(n, logits)
    }
    /// Engines that decode and preprocess images on their own device answer `Some`; the
    /// pipeline then skips the CPU decoder.
    fn device_images(&mut self) -> Option<&mut dyn DeviceImages> {
        None
    }
    /// Engines that read requests straight from device memory (GPUDirect rings) and write
    /// the reply's top-5 there answer `Some`; the pipeline otherwise copies such a request's
    /// payload to the host first.
    fn resident_requests(&mut self) -> Option<&mut dyn ResidentRequests> {
        None
    }
}

/// Requests whose payload stays in device memory (a GPUDirect ring slot) and whose reply
/// body's top-5 part (and, asked for, the logits after it) the engine writes into a device
/// reply slot, for the NIC to send from there: no payload byte crosses host memory.
pub trait ResidentRequests {
    /// Processed task: `tensor` holds the 1x3x224x224 f32 LE input (any alignment), read by
    /// the engine's input conversion where it lies; runs the model and writes the reply's
    /// top-5 part (+ logits when `logits`) into `reply`. A non-finite value is
    /// [`EngineError::BadInput`] naming its index, as on the host path.
    fn infer_resident_tensor(
        &mut self,
        tensor: DeviceSpan<'_>,
        reply: DeviceSpan<'_>,
        logits: bool,
    ) -> Result<(), EngineError>;
    /// After [`DeviceImages::preprocess`] (or [`Self::preprocess_resident_bgr`]): runs the
    /// model on the input left on the device and writes the reply's top-5 part into `reply`.
    fn run_preprocessed_into(
        &mut self,
        reply: DeviceSpan<'_>,
        logits: bool,
    ) -> Result<(), EngineError>;
    /// Raw task: resizes, crops and normalises `width` x `height` packed BGR8 `pixels` lying
    /// in device memory into the engine's device input (as the JPEG path after its decode).
    fn preprocess_resident_bgr(
        &mut self,
        width: usize,
        height: usize,
        pixels: DeviceSpan<'_>,
    ) -> Result<(), EngineError>;
}

/// Decode and preprocessing on the engine's device, as three stages so that each can be
/// timed: the image goes from JPEG bytes to the engine's device input without a host copy.
pub trait DeviceImages {
    /// Decodes a JPEG into device memory; returns (width, height). An image the decoder
    /// rejects is [`EngineError::BadInput`].
    fn decode(&mut self, jpeg: &[u8]) -> Result<(usize, usize), EngineError>;
    /// Resizes, crops and normalises the decoded image straight into the engine's device
    /// input buffer, and waits for it.
    fn preprocess(&mut self) -> Result<(), EngineError>;
    /// Runs the model on the input [`preprocess`](Self::preprocess) left on the device.
    fn run_preprocessed(&mut self, logits: &mut [f32]) -> Result<(), EngineError>;
    /// Like [`preprocess`](Self::preprocess), into slot `slot` (< the engine's
    /// [`max_batch`](InferenceEngine::max_batch)) of the input
    /// [`run_slots`](InferenceEngine::run_slots) runs.
    fn preprocess_slot(&mut self, slot: usize) -> Result<(), EngineError>;
    /// The raw task's stages on the device: resizes, crops and normalises `width x height`
    /// BGR8 HWC pixels (host memory) into the engine's device input (slot `slot` of the
    /// batch input when given), as [`preprocess`](Self::preprocess) does after a decode.
    /// Ok(false): this device does not take raw pixels, and the CPU does it instead.
    fn preprocess_bgr(
        &mut self,
        _width: usize,
        _height: usize,
        _bgr: &[u8],
        _slot: Option<usize>,
    ) -> Result<bool, EngineError> {
        Ok(false)
    }
    /// The largest image (w*h) to decode (`--max-image-pixels`); above it `decode` refuses
    /// with [`EngineError::BadInput`] (the pipeline checks the JPEG header first; this is the
    /// decoder's own guard).
    fn limit_image_pixels(&mut self, _max_pixels: usize) {}
    /// Gives back what an image above the steady-state size made the decode buffers grow by
    /// (called after each request; nothing to do when nothing grew).
    fn release_growth(&mut self) {}
    /// Device bytes the decode buffers hold now (the decoded image and the decoder's own).
    fn decode_buffer_bytes(&self) -> usize {
        0
    }
    /// Decodes and preprocesses `jpegs` (requests that were ready together, at most the
    /// engine's [`max_batch`](InferenceEngine::max_batch)) into consecutive slots of the
    /// batch input, as few decoder calls as the device allows (nvJPEG's hardware backend
    /// takes them as one batch), and pushes one [`SlotStage`] per image, in order, into
    /// `stages` (cleared first; its capacity is kept, so steady traffic allocates nothing).
    /// The default stages them one by one ([`decode`](Self::decode) +
    /// [`preprocess_slot`](Self::preprocess_slot)).
    fn stage_batch(&mut self, jpegs: &[&[u8]], stages: &mut Vec<SlotStage>) {
        stages.clear();
        let mut slot = 0;
        for jpeg in jpegs {
            let stage = match self.decode(jpeg) {
                Err(EngineError::BadInput(why)) => SlotStage::Refused(why),
                Err(e) => SlotStage::Failed(e),
                Ok(_) => {
                    let decoded_ns = crate::clock::realtime_ns();
                    match self.preprocess_slot(slot) {
                        Ok(()) => {
                            slot += 1;
                            SlotStage::Staged {
                                slot: slot - 1,
                                decoded_ns,
                                preprocessed_ns: crate::clock::realtime_ns(),
                            }
                        }
                        Err(e) => SlotStage::Failed(e),
                    }
                }
            };
            stages.push(stage);
        }
    }
    /// How the device decoder has decoded so far (None: it keeps no counts).
    fn decode_counts(&self) -> Option<DecodeCounts> {
        None
    }
}

/// What [`DeviceImages::stage_batch`] did with one image.
#[derive(Debug)]
pub enum SlotStage {
    /// Decoded and preprocessed into batch slot `slot`, at these times (ns, realtime).
    Staged {
        slot: usize,
        decoded_ns: u64,
        preprocessed_ns: u64,
    },
    /// The device decoder refused the image (why): it is to be handled on its own, where
    /// the CPU decoder has the last word.
    Refused(String),
    /// The device failed (not the image's fault).
    Failed(EngineError),
}

/// Images a device decoder decoded, by path (for logs, tests and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeCounts {
    /// Decoded by nvJPEG's hardware backend (NVJPG engines), in `hardware_batches` calls.
    pub hardware: u64,
    pub hardware_batches: u64,
    /// Decoded by the hybrid backend (CPU Huffman, GPU IDCT): what the hardware backend
    /// refused (`nvjpegDecodeBatchedSupported`), or every image where it is absent.
    pub hybrid: u64,
    /// Hardware batches that failed as a whole, whose images were decoded again (hybrid).
    pub hardware_failures: u64,
    /// Refused by every device decoder: left to the CPU decoder.
    pub refused: u64,
}

/// A loaded, optimised model from which per-worker sessions are made.
pub trait EngineLoader: Send + Sync {
    fn session(&self) -> Result<Box<dyn InferenceEngine>, EngineError>;
    /// A session for priority clients' requests: on the GPU, its stream has the highest
    /// priority, so its kernels overtake the other sessions' queued work. Backends without
    /// such a notion give a plain session.
    fn priority_session(&self) -> Result<Box<dyn InferenceEngine>, EngineError> {
        self.session()
    }
}

// The backend contract: what a backend file gives the registry. It lives here, below both
// the backends and the registry table, so that neither imports the other's level.

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("{0}")]
    Option(String),
    /// `--backend help`: not a failure of the options, the answer to a question; callers may
    /// print it and exit successfully ([`BackendError::is_help`]).
    #[error("{0}")]
    Help(String),
    /// A device the backend could not give (a GPU stream for RDMA's GPU memory).
    #[error("{0}")]
    Device(String),
    #[error("loading model {model} on {device}: {source}")]
    Load {
        model: PathBuf,
        device: String,
        #[source]
        source: EngineError,
    },
    #[error("creating the engine context of worker {worker} on {device}: {source}")]
    Session {
        worker: usize,
        device: String,
        #[source]
        source: EngineError,
    },
}

impl BackendError {
    /// Whether this is the answer to `--backend help` rather than an error.
    pub fn is_help(&self) -> bool {
        matches!(self, BackendError::Help(_))
    }
}

/// One registered backend: what `--backend NAME` selects.
pub struct BackendEntry {
    /// The `--backend` value.
    pub name: &'static str,
    /// One line for `--backend help`: what runs where, and which options apply.
    pub about: &'static str,
    /// Reads the options this backend uses (warning about set ones it ignores) and checks
    /// them; `--workers` >= 1 is checked before.
    pub configure: fn(&BackendArgs) -> Result<Box<dyn Backend>, BackendError>,
}

/// A configured backend: its devices, and how to load the model on each.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// One line for the start banner.
    fn describe(&self) -> String;
    /// Workers (one engine session each) these options imply.
    fn workers(&self) -> usize;
    /// Names of the devices the model is loaded on, for errors ("the CPU", "GPU 1"); worker
    /// i runs on device i % devices.
    fn devices(&self) -> Vec<String>;
    /// Loads and prepares the model on device `device` (an index into [`Self::devices`]).
    fn load(&self, model: &Path, device: usize) -> Result<Box<dyn EngineLoader>, EngineError>;
    /// GPU ordinals, empty for backends without GPUs (RDMA's GPU memory needs one).
    fn gpus(&self) -> &[usize] {
        &[]
    }
    /// A stream on GPU `ordinal` for work outside the engine (RDMA request rings in GPU
    /// memory are allocated and read on it): the backend owns its devices' contexts.
    fn device_stream(&self, ordinal: usize) -> Result<Arc<CudaStream>, BackendError> {
        Err(BackendError::Device(format!(
            "GPU {ordinal}: the {} backend has no GPU",
            self.describe()
        )))
    }
    /// Workers that serve priority requests first (on a high-priority stream where the
    /// device has one); 0 = every worker takes the priority lane first.
    fn priority_workers(&self, _workers: usize, _priority_clients: bool) -> usize {
        0
    }
}

/// The backend options as the CLIs spell them.
#[derive(Debug, Clone)]
pub struct BackendArgs<'a> {
    pub backend: &'a str,
    pub precision: &'a str,
    pub gpus: &'a str,
    pub decode: &'a str,
    pub threads: usize,
    pub workers: usize,
    /// The original's `--streams`: engine contexts (CUDA streams) per GPU; 0 = use workers.
    pub streams: u32,
    /// Dynamic batch of the GPU backend (`--max-batch`).
    pub max_batch: usize,
    /// `--preferred-batch-sizes`: "auto" (powers of two below `max_batch`), "none", or a
    /// comma-separated list; each gets its own batch context and CUDA graph.
    pub preferred_batch_sizes: &'a str,
    /// `--overlap-batches`: two batch contexts per worker, so that the next batch is decoded
    /// and preprocessed while the last one runs (GPU backend with GPU decode and a batch).
    pub overlap_batches: bool,
}

//! Inference backends. A backend is one file implementing [`InferenceEngine`]; the pipeline
//! only sees the trait, so adding a GPU engine later touches nothing else.

pub mod cudnn_gpu;
pub mod gpu_images;
pub mod tract_cpu;

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
    /// Engines that decode and preprocess images on their own device answer `Some`; the
    /// pipeline then skips the CPU decoder.
    fn device_images(&mut self) -> Option<&mut dyn DeviceImages> {
        None
    }
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

    /// Images one [`run_slots`](Self::run_slots) call takes: the dynamic batch. 1 = none.
    fn max_batch(&self) -> usize {
        1
    }
    /// Like [`preprocess`](Self::preprocess), into slot `slot` (< `max_batch`) of the batch
    /// input.
    fn preprocess_slot(&mut self, slot: usize) -> Result<(), EngineError> {
        if slot == 0 {
            self.preprocess()
        } else {
            Err(EngineError::Run(format!("slot {slot} of a batch of 1")))
        }
    }
    /// Runs the model once on slots `0..n` (`n <= max_batch`) and writes `n * num_classes`
    /// logits, image after image.
    fn run_slots(&mut self, n: usize, logits: &mut [f32]) -> Result<(), EngineError> {
        if n == 1 {
            self.run_preprocessed(logits)
        } else {
            Err(EngineError::Run(format!(
                "a batch of {n} on an engine of batch 1"
            )))
        }
    }
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

//! Inference backends. A backend is one file implementing [`InferenceEngine`]; the pipeline
//! only sees the trait, so adding a GPU engine later touches nothing else.

pub mod cudnn_gpu;
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
    /// Runs one forward pass on an NCHW f32 tensor of `input_shape()` and writes the raw logits
    /// (before softmax) into `logits`, whose length is `num_classes()`.
    fn infer(&mut self, input: &[f32], logits: &mut [f32]) -> Result<(), EngineError>;
}

/// A loaded, optimised model from which per-worker sessions are made.
pub trait EngineLoader: Send + Sync {
    fn session(&self) -> Result<Box<dyn InferenceEngine>, EngineError>;
}

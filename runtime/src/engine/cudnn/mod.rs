//! GPU backend on cuDNN + cuBLAS, layered like tract: reads the same ONNX ResNets as the CPU
//! backend (through the shared front end, [`crate::engine::onnx`]), folds BatchNormalization
//! into the convolutions, fuses ReLU and the residual Add into
//! `cudnnConvolutionBiasActivationForward`, and runs FP32 NCHW (or, with [`Precision::Fp16`],
//! FP16 NHWC on tensor cores) on one stream per session. Files, one layer each:
//! * [`plan`] (no GPU): [`Plan::from_proto`] walks the ONNX nodes and produces [`Step`]s over
//!   numbered activation tensors, with folded host weights; `plan_tests.rs` runs a plan on
//!   the host against tract.
//! * `weights.rs`: the plan's parameters in the precision's layout (KRSC half for FP16),
//!   uploaded once per GPU by [`CudnnLoader`] and shared by its sessions.
//! * `session.rs`: [`CudnnSession`], one worker's context (stream, cuDNN/cuBLAS handles,
//!   activation buffers, workspace, CUDA graph, the dynamic-batch context), so a run
//!   allocates nothing: copy in, one graph replay (or one launch per layer), copy logits out.
//! * `layers.rs`: the launches a session is made of, built from the plan's steps (descriptors,
//!   algorithm choice, the cuDNN fall-back) and queued on the stream.
//! * `measure.rs`: per-layer device time, each layer in a CUDA graph of its own: the
//!   measured conv-algorithm choice at session start (every algorithm the fused call accepts
//!   is timed, the fastest kept, once per batch size per loader: PyTorch's cudnn.benchmark)
//!   and the profile `bench_gpu` prints ([`Profile`]).
//! * [`images`]: nvJPEG decode + the preprocessing kernel into the session's input, the
//!   session's [`DeviceImages`].
//! * `resident.rs`: requests read from GPU memory and replies' top-5 written there
//!   (GPUDirect rings), the session's [`ResidentRequests`](super::ResidentRequests).
//! * this file: the options, the loader, and the registry entry (`--backend gpu`).
//!
//! Fusion onto cuDNN, per conv step: y = act(conv(x, w') + b' + alpha2 * z), where w', b' carry
//! the folded BN; act = RELU when a Relu follows (directly, or after the Add), else IDENTITY
//! (then cuDNN only supports IMPLICIT_PRECOMP_GEMM); z = the shortcut tensor with alpha2 = 1 when
//! an Add consumes the conv output, else a zero buffer with alpha2 = 0.

pub mod images;
mod layers;
mod measure;
pub mod plan;
#[cfg(test)]
mod plan_tests;
mod resident;
mod session;
mod weights;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hacserve_ffi::gpu::cuda::cu;
use hacserve_ffi::gpu::ops::{self as gpu_ops, ConvAlgo, GpuDevice, GpuOpsError, HalfKernels};
use hacserve_ffi::gpu::resident::ResidentKernels;

pub use images::imagenet_geometry;
use images::GpuImageKernels;
pub use measure::{LayerTime, Profile};
pub use plan::{Plan, Step};
pub use session::CudnnSession;
use weights::DevBuf;

use super::onnx::bad_model;
#[cfg(doc)]
use super::DeviceImages;
use super::{Backend, BackendArgs, BackendEntry, BackendError};
use super::{EngineError, EngineLoader, InferenceEngine};

/// Numeric mode of the convolutions (activations and weights are FP32 in Fp32 and Tf32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Plain FP32 FMA kernels (CUDNN_FMA_MATH): matches the CPU to ~1e-5 relative.
    Fp32,
    /// cuDNN default math: TF32 tensor cores on Ampere/Hopper (~1e-3..1e-2 relative).
    #[default]
    Tf32,
    /// FP16 activations and conv weights in NHWC (KRSC filters), tensor-op math with FP32
    /// accumulation; the input is converted on the GPU (f32 NCHW -> f16 NHWC, the 3 image
    /// channels zero-padded to 8), the pooled features back to f32 for an FP32 classifier GEMM.
    Fp16,
}

/// Options of [`CudnnLoader::load_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudnnOptions {
    /// Images per `infer` call (the per-request path uses 1).
    pub batch: usize,
    pub precision: Precision,
    /// Capture the layers into a CUDA graph at session start and replay it per `infer` (one
    /// launch instead of one per layer); falls back to eager launches, with a warning, where
    /// the capture fails.
    pub cuda_graph: bool,
    /// Decode JPEGs with nvJPEG and preprocess them with the NVRTC kernel on this GPU
    /// ([`DeviceImages`]); batch 1 only.
    pub gpu_decode: bool,
    /// With `gpu_decode`: each session also holds a context of this batch size (its own
    /// CUDA graph) so that JPEG requests that are ready together run as one batch
    /// ([`InferenceEngine::run_slots`]). 1 = no dynamic batching.
    pub max_batch: usize,
    /// With `gpu_decode`: nvJPEG's hardware backend (NVJPG engines, batched API) for the
    /// images it takes, where the GPU has it; the hybrid backend for the rest.
    pub hardware_decode: bool,
    /// With `max_batch` > 1: smaller batch contexts (bit b-1 = a context of b images, each
    /// with its own CUDA graph); a batch of n device-decoded JPEGs runs on the smallest
    /// context of at least n images instead of always the `max_batch` one (Triton's
    /// preferred batch sizes). 0 = only `max_batch`.
    pub preferred_batches: u64,
    /// With `max_batch` > 1 (`--overlap-batches`): a second set of batch contexts (their
    /// own graphs, streams and buffers), so that a worker decodes and preprocesses its next
    /// batch into one set while the run of its last batch on the other is still on the GPU
    /// ([`InferenceEngine::batch_sets`] = 2).
    pub overlap_batches: bool,
}

/// Powers of two from 2 below `max_batch`, as a [`CudnnOptions::preferred_batches`] mask.
pub fn powers_of_two_below(max_batch: usize) -> u64 {
    let mut mask = 0u64;
    let mut b = 2usize;
    while b < max_batch.min(65) {
        mask |= 1 << (b - 1);
        b *= 2;
    }
    mask
}

/// The sizes of a [`CudnnOptions::preferred_batches`] mask below `max_batch`, ascending.
fn preferred_sizes(mask: u64, max_batch: usize) -> Vec<usize> {
    (1..max_batch.min(65))
        .filter(|b| mask & (1 << (b - 1)) != 0)
        .collect()
}

impl Default for CudnnOptions {
    fn default() -> Self {
        CudnnOptions {
            batch: 1,
            precision: Precision::Tf32,
            cuda_graph: false,
            gpu_decode: false,
            max_batch: 1,
            hardware_decode: false,
            preferred_batches: 0,
            overlap_batches: false,
        }
    }
}

/// A planned model with its weights on one GPU; sessions share the weights.
pub struct CudnnLoader {
    device: Arc<GpuDevice>,
    plan: Arc<Plan>,
    weights: Arc<Vec<DevBuf>>,
    half: Option<Arc<HalfKernels>>,
    images: Option<Arc<GpuImageKernels>>,
    /// The GPU-ring kernels (None where NVRTC is missing: GPU-resident requests are then
    /// copied to the host first).
    resident: Option<Arc<ResidentKernels>>,
    /// The same model planned for `options.max_batch` images (dynamic batching).
    batch_plan: Option<Arc<Plan>>,
    /// And for each preferred batch size below it, ascending.
    preferred_plans: Vec<Arc<Plan>>,
    options: CudnnOptions,
    /// Measured conv algorithms per batch size (layer index, algorithm), chosen by the first
    /// session of that size (with CUDA graphs) and reused by the rest.
    tuned: Mutex<HashMap<usize, Vec<(usize, ConvAlgo)>>>,
}

impl CudnnLoader {
    /// Batch 1, TF32 convolutions on GPU `device`.
    pub fn load(path: &Path, device: usize) -> Result<Self, EngineError> {
        Self::load_with(path, device, CudnnOptions::default())
    }

    pub fn load_with(
        path: &Path,
        device: usize,
        options: CudnnOptions,
    ) -> Result<Self, EngineError> {
        let plan = Plan::load(path, options.batch)?;
        if options.gpu_decode && options.batch != 1 {
            return Err(EngineError::Run(format!(
                "GPU decoding feeds batch-1 sessions, not batch {}",
                options.batch
            )));
        }
        // The session tracks its batch slots one bit each in a u64.
        if options.max_batch > 64 {
            return Err(EngineError::Run(format!(
                "a dynamic batch of {} (at most 64)",
                options.max_batch
            )));
        }
        let batch_plan = if options.gpu_decode && options.max_batch > 1 {
            let batched = Plan::load(path, options.max_batch)?;
            // Same ONNX, other batch: the parameters (and so the shared weights) match.
            if !weights::same_params(&plan, &batched) {
                return Err(bad_model(path, "batch plan differs from the batch-1 plan"));
            }
            Some(Arc::new(batched))
        } else {
            None
        };
        let mut preferred_plans = Vec::new();
        if batch_plan.is_some() {
            for b in preferred_sizes(options.preferred_batches, options.max_batch) {
                let p = Plan::load(path, b)?;
                if !weights::same_params(&plan, &p) {
                    return Err(bad_model(path, "batch plan differs from the batch-1 plan"));
                }
                preferred_plans.push(Arc::new(p));
            }
        }
        let gpu = GpuDevice::open(device).map_err(run_err)?;
        let fp16 = options.precision == Precision::Fp16;
        let weights = weights::upload(&gpu, &plan, fp16).map_err(run_err)?;
        let half = if fp16 {
            Some(Arc::new(gpu.half_kernels().map_err(run_err)?))
        } else {
            None
        };
        let images = if options.gpu_decode {
            Some(Arc::new(GpuImageKernels::new(gpu.context())?))
        } else {
            None
        };
        let resident = match ResidentKernels::new(gpu.context()) {
            Ok(k) => Some(Arc::new(k)),
            Err(e) => {
                log::warn!("GPU-ring kernels unavailable ({e}): GPUDirect requests will be copied to the host");
                None
            }
        };
        Ok(CudnnLoader {
            device: Arc::new(gpu),
            resident,
            plan: Arc::new(plan),
            weights: Arc::new(weights),
            half,
            images,
            batch_plan,
            preferred_plans,
            options,
            tuned: Mutex::new(HashMap::new()),
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn device_name(&self) -> String {
        self.device.name().unwrap_or_else(|e| e.to_string())
    }

    pub fn cudnn_session(&self) -> Result<CudnnSession, EngineError> {
        CudnnSession::new(self, false)
    }
}

impl EngineLoader for CudnnLoader {
    fn session(&self) -> Result<Box<dyn InferenceEngine>, EngineError> {
        Ok(Box::new(CudnnSession::new(self, false)?))
    }

    fn priority_session(&self) -> Result<Box<dyn InferenceEngine>, EngineError> {
        Ok(Box::new(CudnnSession::new(self, true)?))
    }
}

/// Whether the engine can run here (driver, cuDNN, cuBLAS), for callers and tests to skip;
/// the error names the missing library.
pub fn available() -> Result<(), GpuOpsError> {
    gpu_ops::available()
}

fn run_err(e: GpuOpsError) -> EngineError {
    EngineError::Run(e.to_string())
}

/// The registry entry: `--backend gpu`.
pub const BACKEND: BackendEntry = BackendEntry {
    name: "gpu",
    about: "cuDNN/cuBLAS with CUDA graphs on NVIDIA GPUs; --gpus, --precision fp16|tf32|fp32, \
            --decode gpu|hybrid|cpu (nvJPEG hardware+hybrid, hybrid only, CPU), --streams per \
            GPU, --max-batch (GPU decode)",
    configure,
};

/// `--backend gpu` as configured: one loader per GPU, `workers` sessions round-robin.
#[derive(Debug)]
struct GpuBackend {
    gpus: Vec<usize>,
    options: CudnnOptions,
    workers: usize,
}

fn configure(a: &BackendArgs) -> Result<Box<dyn Backend>, BackendError> {
    let bad = |m: String| Err(BackendError::Option(m));
    let gpus = parse_gpus(a.gpus)?;
    let precision = match a.precision {
        "fp16" => Precision::Fp16,
        "tf32" => Precision::Tf32,
        "fp32" => Precision::Fp32,
        other => return bad(format!("--precision {other:?}: use fp16, tf32 or fp32")),
    };
    let (gpu_decode, hardware_decode) = match a.decode {
        "gpu" => (true, true),
        "hybrid" => (true, false),
        "cpu" => (false, false),
        other => return bad(format!("--decode {other:?}: use gpu, hybrid or cpu")),
    };
    if !(1..=64).contains(&a.max_batch) {
        return bad(format!("--max-batch {} must be 1..=64", a.max_batch));
    }
    let preferred_batches = match a.preferred_batch_sizes {
        "auto" => powers_of_two_below(a.max_batch),
        "none" | "" => 0,
        list => {
            let mut mask = 0u64;
            for b in list.split(',') {
                match b.trim().parse::<usize>() {
                    Ok(b) if (1..a.max_batch).contains(&b) => mask |= 1 << (b - 1),
                    _ => {
                        return bad(format!(
                            "--preferred-batch-sizes {list:?}: each size must be 1..{} (below --max-batch)",
                            a.max_batch
                        ))
                    }
                }
            }
            mask
        }
    };
    // --streams N: N engine contexts (each a worker with its own stream) per GPU.
    let workers = if a.streams > 0 {
        a.streams as usize * gpus.len()
    } else {
        a.workers
    };
    Ok(Box::new(GpuBackend {
        gpus,
        options: CudnnOptions {
            batch: 1,
            precision,
            cuda_graph: true,
            gpu_decode,
            // Dynamic batching stays with GPU decode: with CPU decode the sessions keep
            // batch 1, as before the batch became part of the engine contract.
            max_batch: if gpu_decode { a.max_batch } else { 1 },
            hardware_decode,
            preferred_batches: if gpu_decode { preferred_batches } else { 0 },
            overlap_batches: gpu_decode && a.max_batch > 1 && a.overlap_batches,
        },
        workers,
    }))
}

impl Backend for GpuBackend {
    fn describe(&self) -> String {
        let o = &self.options;
        format!(
            "cudnn-gpu {:?} + CUDA graph on GPUs {:?}, {} decode, dynamic batch up to {}{}",
            o.precision,
            self.gpus,
            match (o.gpu_decode, o.hardware_decode) {
                // Unchanged from before the hardware backend (which says at start whether
                // this GPU has it); `--decode hybrid` names itself.
                (true, true) => "nvJPEG",
                (true, false) => "nvJPEG hybrid",
                _ => "CPU",
            },
            o.max_batch,
            if o.overlap_batches {
                ", overlapped"
            } else {
                ""
            }
        )
    }

    fn workers(&self) -> usize {
        self.workers
    }

    fn devices(&self) -> Vec<String> {
        self.gpus.iter().map(|g| format!("GPU {g}")).collect()
    }

    fn load(&self, model: &Path, device: usize) -> Result<Box<dyn EngineLoader>, EngineError> {
        let gpu = *self
            .gpus
            .get(device)
            .ok_or_else(|| EngineError::Run(format!("no GPU number {device} in the list")))?;
        Ok(Box::new(CudnnLoader::load_with(model, gpu, self.options)?))
    }

    fn gpus(&self) -> &[usize] {
        &self.gpus
    }

    fn device_stream(&self, ordinal: usize) -> Result<Arc<cu::CudaStream>, BackendError> {
        hacserve_ffi::gpu::cuda::driver(ordinal)
            .and_then(|ctx| Ok(ctx.new_stream()?))
            .map_err(|e| BackendError::Device(e.to_string()))
    }

    fn priority_workers(&self, workers: usize, priority_clients: bool) -> usize {
        if priority_clients && workers > self.gpus.len() {
            self.gpus.len()
        } else {
            0
        }
    }
}

/// "0,1,3" -> [0, 1, 3]; no duplicates.
pub fn parse_gpus(list: &str) -> Result<Vec<usize>, BackendError> {
    let mut gpus = Vec::new();
    for g in list.split(',') {
        let id = g
            .trim()
            .parse::<usize>()
            .map_err(|_| BackendError::Option(format!("bad GPU id {g:?} in --gpus {list:?}")))?;
        if gpus.contains(&id) {
            return Err(BackendError::Option(format!(
                "GPU {id} is listed twice in --gpus {list:?}"
            )));
        }
        gpus.push(id);
    }
    Ok(gpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_gen;

    #[test]
    fn preferred_batch_sizes_parse_and_stay_below_the_max() {
        assert_eq!(preferred_sizes(powers_of_two_below(16), 16), vec![2, 4, 8]);
        assert_eq!(
            preferred_sizes(powers_of_two_below(2), 2),
            Vec::<usize>::new()
        );
        assert_eq!(
            preferred_sizes(powers_of_two_below(64), 64),
            vec![2, 4, 8, 16, 32]
        );
        let args = |sizes| BackendArgs {
            backend: "gpu",
            precision: "fp16",
            gpus: "0",
            decode: "gpu",
            threads: 1,
            workers: 1,
            streams: 0,
            max_batch: 16,
            preferred_batch_sizes: sizes,
            overlap_batches: true,
        };
        let described = |sizes| configure(&args(sizes)).map(|b| format!("{b:?}"));
        assert!(described("4,12")
            .unwrap()
            .contains("preferred_batches: 2056"));
        assert!(described("none").unwrap().contains("preferred_batches: 0"));
        assert!(described("none").unwrap().contains("overlap_batches: true"));
        for bad in ["16", "0", "3,x"] {
            let err = described(bad).unwrap_err().to_string();
            assert!(err.contains("--preferred-batch-sizes"), "{bad}: {err}");
        }
    }

    #[test]
    fn no_gpu_is_an_error_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("hacserve-cudnn-{}", std::process::id()));
        let path = dir.join("tiny.onnx");
        model_gen::write_model(&model_gen::tiny_resnet(1), &path).unwrap();
        match CudnnLoader::load(&path, 0) {
            Ok(l) => eprintln!("GPU present: {}", l.device_name()),
            Err(e) => {
                eprintln!("SKIPPED cuDNN loader check: {e}");
                assert!(matches!(e, EngineError::Run(_)), "{e}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

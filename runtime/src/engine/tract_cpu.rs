//! CPU backend on tract-onnx: the model is parsed and optimised once ([`TractLoader`]), then each
//! worker gets a [`TractSession`] with its own execution state and its own intra-op thread pool,
//! so workers never share a lock or a pool.
//!
//! The shared front end ([`super::onnx`]) reads the file, names unsupported operators and
//! fixes the input shape; tract then parses and optimises the graph itself. The backend's
//! registry entry ([`BACKEND`], `--backend cpu`) is at the end of this file. Sessions keep
//! the engine contract's default batch of 1: the pipeline's batching works through
//! [`InferenceEngine::run_slots`], which here is one [`InferenceEngine::run`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

use super::onnx::{self, bad_model};
use super::{Backend, BackendArgs, BackendEntry, BackendError};
use super::{EngineError, EngineLoader, InferenceEngine};

/// A parsed, batch-1, optimised model. Cheap to share: sessions hold an `Arc` of the plan.
pub struct TractLoader {
    plan: Arc<TypedRunnableModel>,
    input_shape: [usize; 4],
    num_classes: usize,
    threads: usize,
}

/// Time spent in one node of the optimised plan, see [`TractLoader::profile_nodes`].
#[derive(Debug, Clone)]
pub struct NodeTime {
    /// Node name in the optimised plan (derived from the ONNX node names).
    pub node: String,
    /// tract op kind, e.g. "OptMatMul", "LazyIm2col".
    pub op: String,
    /// For matrix products: "m:.. k:.. n:.. with \[kernel\]"; empty otherwise.
    pub detail: String,
    /// Multiply-accumulates per run, from m*k*n (0 when not a matrix product).
    pub macs: u64,
    /// Mean time per run.
    pub mean: Duration,
}

/// "m:256 k:2304 n:196 with [avx512_mmm_f32_16x12]" and m*k*n, from tract's OptMatMul info.
fn matmul_detail(info: &[String]) -> (String, u64) {
    let Some(line) = info.iter().find_map(|l| l.strip_prefix("Mult: ")) else {
        return (String::new(), 0);
    };
    let dims: Vec<u64> = line
        .split_whitespace()
        .take(3)
        .filter_map(|t| t.split(':').nth(1)?.parse().ok())
        .collect();
    let macs = if dims.len() == 3 {
        dims.iter().product()
    } else {
        0
    };
    (line.to_string(), macs)
}

/// Intra-op executor for one session: a private rayon pool of `threads`, or none for 1.
fn make_executor(threads: usize) -> Result<Executor, EngineError> {
    if threads <= 1 {
        return Ok(Executor::SingleThread);
    }
    // tract panics if the OS refuses the threads; turn that into an error for the caller.
    std::panic::catch_unwind(|| Executor::multithread_with_name(threads, "tract-intra"))
        .map_err(|_| EngineError::Run(format!("cannot start a {threads}-thread tract pool")))
}

impl TractLoader {
    /// Reads the ONNX model at `path`, fixes its single input to batch 1 (keeping the model's
    /// C, H, W when they are static), optimises it, and prepares the plan. `threads` is the number
    /// of intra-op threads each session uses (1 = single-threaded).
    pub fn load(path: &Path, threads: usize) -> Result<Self, EngineError> {
        let proto = onnx::read_model(path)?;
        Self::from_proto(&proto, path, threads)
    }

    /// Same as [`TractLoader::load`] for an in-memory model; `path` only names it in errors and
    /// locates external data files.
    pub fn from_proto(
        proto: &ModelProto,
        path: &Path,
        threads: usize,
    ) -> Result<Self, EngineError> {
        let tract = tract_onnx::onnx();
        let graph = onnx::graph(proto, path)?;
        let known = &tract.op_register.0;
        onnx::check_ops(graph, path, "tract", &|n| known.contains_key(&n.op_type))?;
        // Batch 1, keeping the model's C, H, W where they are static.
        let (_, input_shape) = onnx::input_shape(graph, path, 1)?;

        let dir = path.parent().and_then(|d| d.to_str());
        let parsed = tract
            .parse(proto, dir)
            .map_err(|e| bad_model(path, format!("{e:#}")))?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(bad_model(
                path,
                format!("unresolved inputs: {:?}", parsed.unresolved_inputs),
            ));
        }
        let mut model = parsed.model;
        // Names differ between exporters ("input", "data", ...): go by position only.
        if model.inputs.len() != 1 || model.outputs.is_empty() {
            return Err(bad_model(
                path,
                format!(
                    "want 1 input and at least 1 output, model has {} and {}",
                    model.inputs.len(),
                    model.outputs.len()
                ),
            ));
        }
        // A concrete batch before optimisation lets tract pick fixed-size kernels and fold
        // BatchNormalization into the conv weights.
        model
            .set_input_fact(0, f32::fact(input_shape).into())
            .map_err(|e| bad_model(path, format!("{e:#}")))?;
        if model.outputs.len() > 1 {
            let first = model.outputs[0];
            model
                .select_output_outlets(&[first])
                .map_err(|e| bad_model(path, format!("{e:#}")))?;
        }
        let typed = model
            .into_optimized()
            .map_err(|e| bad_model(path, format!("cannot optimise: {e:#}")))?;
        let out_fact = typed
            .output_fact(0)
            .map_err(|e| bad_model(path, format!("{e:#}")))?;
        let out_shape = out_fact
            .shape
            .as_concrete()
            .ok_or_else(|| bad_model(path, format!("output shape is not static: {out_fact:?}")))?;
        let num_classes = out_shape.iter().product::<usize>();
        if num_classes == 0 {
            return Err(bad_model(path, "model produces no values"));
        }
        let plan = typed
            .into_runnable()
            .map_err(|e| bad_model(path, format!("{e:#}")))?;
        Ok(TractLoader {
            plan,
            input_shape,
            num_classes,
            threads: threads.max(1),
        })
    }

    pub fn input_shape(&self) -> [usize; 4] {
        self.input_shape
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Number of nodes in the optimised plan (for logs: shows how much declutter fused).
    pub fn plan_nodes(&self) -> usize {
        self.plan.model().nodes().len()
    }

    /// A session of the concrete type, for callers that want [`TractSession`] methods.
    pub fn tract_session(&self) -> Result<TractSession, EngineError> {
        TractSession::new(self)
    }

    /// Runs `runs` inferences on `input` (after one untimed run) with this loader's threads,
    /// timing every node of the plan. Diagnostic only: the timing adds a little overhead.
    pub fn profile_nodes(&self, input: &[f32], runs: usize) -> Result<Vec<NodeTime>, EngineError> {
        let runs = runs.max(1);
        let mut session = TractSession::new(self)?;
        if input.len() != session.host_input.len() {
            return Err(EngineError::InputSize {
                got: input.len(),
                want: session.host_input.len(),
            });
        }
        session.host_input.copy_from_slice(input);
        session.load_input()?;
        let model = self.plan.model();
        let mut totals = vec![Duration::ZERO; model.nodes().len()];
        let executor = session.executor.clone();
        for run in 0..=runs {
            let value = TValue::from_const(session.input.clone());
            multithread_tract_scope(executor.clone(), || {
                session
                    .state
                    .run_plan_with_eval(tvec!(value), |ctx, state, node, inputs| {
                        let start = Instant::now();
                        let out = tract_onnx::tract_core::plan::eval(ctx, state, node, inputs);
                        // Run 0 warms caches and allocations up.
                        if run > 0 {
                            totals[node.id] += start.elapsed();
                        }
                        out
                    })
            })
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        }
        let mut out: Vec<NodeTime> = model
            .nodes()
            .iter()
            .filter(|n| !totals[n.id].is_zero())
            .map(|n| {
                let (detail, macs) = n
                    .op()
                    .info()
                    .map(|info| matmul_detail(&info))
                    .unwrap_or_default();
                NodeTime {
                    node: n.name.clone(),
                    op: n.op().name().to_string(),
                    detail,
                    macs,
                    mean: totals[n.id] / runs as u32,
                }
            })
            .collect();
        out.sort_by_key(|n| std::cmp::Reverse(n.mean));
        Ok(out)
    }
}

impl EngineLoader for TractLoader {
    fn session(&self) -> Result<Box<dyn InferenceEngine>, EngineError> {
        Ok(Box::new(TractSession::new(self)?))
    }
}

/// One worker's inference context: its own tract state, intra-op pool and input buffer.
pub struct TractSession {
    state: TypedSimpleState,
    executor: Executor,
    /// Reused across calls: once a run finishes, tract drops its references and the buffer is
    /// exclusive again, so no per-request allocation.
    input: Arc<Tensor>,
    /// Where callers write the next input ([`InferenceEngine::input_mut`]).
    host_input: Vec<f32>,
    input_shape: [usize; 4],
    num_classes: usize,
}

impl TractSession {
    fn new(loader: &TractLoader) -> Result<Self, EngineError> {
        let state = loader
            .plan
            .spawn()
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        let input = Tensor::zero::<f32>(&loader.input_shape)
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        Ok(TractSession {
            state,
            executor: make_executor(loader.threads)?,
            input: Arc::new(input),
            host_input: vec![0.0; loader.input_shape.iter().product()],
            input_shape: loader.input_shape,
            num_classes: loader.num_classes,
        })
    }

    /// Copies `host_input` (always of the input's size) into the tensor tract reads.
    fn load_input(&mut self) -> Result<(), EngineError> {
        let input = &self.host_input;
        let run_err = |e: TractError| EngineError::Run(format!("{e:#}"));
        match Arc::get_mut(&mut self.input) {
            Some(tensor) => tensor
                .try_as_plain_ram_mut()
                .and_then(|mut view| {
                    view.as_slice_mut::<f32>()?.copy_from_slice(input);
                    Ok(())
                })
                .map_err(run_err)?,
            // Still shared (an op kept a reference): fall back to a fresh buffer.
            None => {
                self.input =
                    Arc::new(Tensor::from_shape(&self.input_shape, input).map_err(run_err)?)
            }
        }
        Ok(())
    }
}

impl InferenceEngine for TractSession {
    fn name(&self) -> &str {
        "tract-cpu"
    }

    fn input_shape(&self) -> [usize; 4] {
        self.input_shape
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn input_mut(&mut self) -> Result<&mut [f32], EngineError> {
        Ok(&mut self.host_input)
    }

    fn run(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        if logits.len() != self.num_classes {
            return Err(EngineError::Run(format!(
                "logits buffer has {} slots, the model produces {}",
                logits.len(),
                self.num_classes
            )));
        }
        self.load_input()?;
        let value = TValue::from_const(self.input.clone());
        let state = &mut self.state;
        let outputs = multithread_tract_scope(self.executor.clone(), || state.run(tvec!(value)))
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        let out = outputs
            .first()
            .ok_or_else(|| EngineError::Run("model returned no output".to_string()))?;
        let values = out
            .try_as_plain_ram()
            .and_then(|v| v.as_slice::<f32>())
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        if values.len() != logits.len() {
            return Err(EngineError::Run(format!(
                "model returned {} values, expected {}",
                values.len(),
                logits.len()
            )));
        }
        logits.copy_from_slice(values);
        Ok(())
    }
}

/// The registry entry: `--backend cpu`.
pub const BACKEND: BackendEntry = BackendEntry {
    name: "cpu",
    about: "tract-onnx on the CPU; --threads intra-op threads per worker, --workers sessions",
    configure,
};

/// `--backend cpu` as configured: `threads` intra-op threads in each of `workers` sessions.
#[derive(Debug)]
struct CpuBackend {
    threads: usize,
    workers: usize,
}

fn configure(a: &BackendArgs) -> Result<Box<dyn Backend>, BackendError> {
    if a.streams > 0 {
        log::info!(
            "--streams {} ignored: the CPU backend has no CUDA streams",
            a.streams
        );
    }
    Ok(Box::new(CpuBackend {
        threads: a.threads.max(1),
        workers: a.workers,
    }))
}

impl Backend for CpuBackend {
    fn describe(&self) -> String {
        format!("tract-cpu x{} threads", self.threads)
    }

    fn workers(&self) -> usize {
        self.workers
    }

    fn devices(&self) -> Vec<String> {
        vec!["the CPU".into()]
    }

    fn load(&self, model: &Path, _device: usize) -> Result<Box<dyn EngineLoader>, EngineError> {
        Ok(Box::new(TractLoader::load(model, self.threads)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_gen;

    fn tiny_model_path(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hacserve-tract-{tag}-{}", std::process::id()));
        let path = dir.join("resnet_tiny.onnx");
        model_gen::write_model(&model_gen::tiny_resnet(50), &path).unwrap();
        path
    }

    fn test_input(len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i % 251) as f32 / 125.0) - 1.0).collect()
    }

    #[test]
    fn tiny_model_runs_and_is_deterministic() {
        let path = tiny_model_path("run");
        for threads in [1, 2] {
            let loader = TractLoader::load(&path, threads).unwrap();
            assert_eq!(loader.input_shape(), [1, 3, 224, 224]);
            assert_eq!(loader.num_classes(), 1000);
            let mut session = loader.session().unwrap();
            assert_eq!(session.name(), "tract-cpu");
            let input = test_input(3 * 224 * 224);
            let mut a = vec![0f32; 1000];
            let mut b = vec![0f32; 1000];
            session.infer(&input, &mut a).unwrap();
            session.infer(&input, &mut b).unwrap();
            assert!(a.iter().all(|v| v.is_finite()));
            assert_eq!(a, b);
            // A second session of the same loader agrees bit for bit.
            let mut c = vec![0f32; 1000];
            loader.session().unwrap().infer(&input, &mut c).unwrap();
            assert_eq!(a, c);
        }
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let path = tiny_model_path("sizes");
        let loader = TractLoader::load(&path, 1).unwrap();
        let mut session = loader.session().unwrap();
        let mut logits = vec![0f32; 1000];
        assert!(matches!(
            session.infer(&[0.0; 10], &mut logits),
            Err(EngineError::InputSize { got: 10, .. })
        ));
        let input = test_input(3 * 224 * 224);
        assert!(session.infer(&input, &mut logits[..10]).is_err());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn missing_file_and_unsupported_op_are_reported() {
        let err = TractLoader::load(Path::new("/nonexistent/model.onnx"), 1)
            .err()
            .unwrap();
        assert!(matches!(err, EngineError::ModelFile { .. }));

        let mut proto = model_gen::tiny_resnet(1);
        let graph = proto.graph.as_mut().unwrap();
        let relu = graph.node.iter_mut().find(|n| n.op_type == "Relu").unwrap();
        relu.op_type = "FancyRelu".to_string();
        let err = TractLoader::from_proto(&proto, Path::new("fancy.onnx"), 1)
            .err()
            .unwrap();
        assert!(err.to_string().contains("FancyRelu"), "{err}");
    }

    #[test]
    fn profile_times_the_matmuls() {
        let path = tiny_model_path("profile");
        let loader = TractLoader::load(&path, 1).unwrap();
        let nodes = loader.profile_nodes(&test_input(3 * 224 * 224), 2).unwrap();
        assert!(nodes.iter().any(|n| n.macs > 0 && n.detail.contains("k:")));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}

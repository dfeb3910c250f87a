//! Device-side timing of a session's layers, each inside a CUDA graph of its own (so the
//! figure is what the layer costs in the session's graph, launch gaps between its kernels
//! included, host launch overhead not), for two uses:
//! * the measured algorithm choice at session start ([`CudnnSession::tune_convs`]): every
//!   algorithm cuDNN accepts for a conv's fused call is timed on the session's own buffers and
//!   the fastest kept (as PyTorch's `cudnn.benchmark`), once per batch size and loader;
//! * the batch-1 profile of `bench_gpu` ([`CudnnSession::profile_layers`]): per-layer device
//!   time and kernel count next to the whole graph's replay time, so the gaps show.

use hacserve_ffi::gpu::ops::{ConvAlgo, GpuOpsError, Graph, Timer};

use super::layers::{ConvOp, Layer};
use super::run_err;
use super::session::CudnnSession;
use crate::engine::EngineError;

/// Replays per timing (the mean is taken).
const REPS: usize = 10;
/// Workspace a measured choice may grow the session's to (the heuristics' choice is kept when
/// only faster algorithms need more).
const WORKSPACE_CAP: usize = 256 << 20;

/// One layer of a profile.
#[derive(Debug, Clone)]
pub struct LayerTime {
    /// What the layer is (conv name and algorithm, pooling, gemm, ...).
    pub layer: String,
    /// Kernel nodes and other nodes (copies, memsets) its graph holds.
    pub kernels: usize,
    pub other_nodes: usize,
    /// Mean device time of one run of the layer, microseconds.
    pub us: f64,
}

/// A batch-1 (or any batch) profile: the layers and the whole graph.
#[derive(Debug, Clone)]
pub struct Profile {
    pub layers: Vec<LayerTime>,
    /// Mean device time of one replay of the session's whole graph, microseconds (None
    /// without a graph).
    pub graph_us: Option<f64>,
    /// Its kernel and other nodes.
    pub graph_kernels: usize,
    pub graph_other_nodes: usize,
}

/// What the measured choice did for one conv.
#[derive(Debug, Clone)]
pub struct TunedConv {
    pub layer: usize,
    pub heuristic: ConvAlgo,
    pub heuristic_us: f64,
    pub chosen: ConvAlgo,
    pub chosen_us: f64,
}

impl CudnnSession {
    /// Captures `reps` runs of layer `i` into a graph of their own.
    fn layer_graph(&mut self, i: usize, reps: usize) -> Result<Graph, GpuOpsError> {
        self.handles.begin_capture()?;
        let mut failed = None;
        for _ in 0..reps {
            if let Err(e) = self.run_layer(i) {
                failed = Some(e);
                break;
            }
        }
        let graph = self.handles.end_capture();
        if let Some(e) = failed {
            return Err(e);
        }
        graph?.ok_or_else(|| GpuOpsError::Geometry(format!("layer {i}: empty graph")))
    }

    /// Mean device time of one run of layer `i` (microseconds), inside a graph of `REPS`
    /// runs replayed once untimed and once timed.
    fn time_layer(&mut self, i: usize, timer: &Timer) -> Result<(f64, Graph), GpuOpsError> {
        let mut graph = self.layer_graph(i, REPS)?;
        self.handles.replay(&mut graph)?;
        self.handles.timer_start(timer)?;
        self.handles.replay(&mut graph)?;
        let ms = self.handles.timer_stop(timer)?;
        Ok((ms * 1e3 / REPS as f64, graph))
    }

    /// Fills the input the first layer reads with a fixed pseudo-random pattern in [-2, 2)
    /// and uploads it, so timings do not run on zeros.
    fn fill_measure_input(&mut self) -> Result<(), EngineError> {
        {
            let input = self
                .host_input
                .as_mut_slice()
                .map_err(|e| run_err(e.into()))?;
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            for v in input.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *v = ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0;
            }
        }
        self.handles.bind().map_err(run_err)?;
        self.upload_input()?;
        // One pass so every activation holds data derived from that input.
        for i in 0..self.layers.len() {
            self.run_layer(i)
                .map_err(|e| EngineError::Run(format!("layer {i}: {e}")))?;
        }
        self.handles.synchronize().map_err(run_err)
    }

    /// Times every algorithm cuDNN accepts for each conv's fused call and keeps the fastest
    /// (ties and failures keep the heuristics' choice). Call after the warm-up, before the
    /// graph capture. Returns what changed and what it measured.
    pub(super) fn tune_convs(&mut self) -> Result<Vec<TunedConv>, EngineError> {
        self.fill_measure_input()?;
        let timer = self.handles.timer().map_err(run_err)?;
        let mut report = Vec::new();
        for i in 0..self.layers.len() {
            let candidates = match &self.layers[i] {
                Layer::Conv { op, .. } => op.candidate_algorithms(),
                _ => continue,
            };
            if candidates.len() < 2 {
                continue;
            }
            let heuristic = self.conv_algorithm(i);
            let (heuristic_us, _) = self
                .time_layer(i, &timer)
                .map_err(|e| EngineError::Run(format!("timing layer {i}: {e}")))?;
            let (mut best, mut best_us) = (heuristic, heuristic_us);
            for algo in candidates {
                if algo == heuristic {
                    continue;
                }
                if let Some(us) = self.try_algorithm(i, algo, &timer) {
                    if us < best_us {
                        (best, best_us) = (algo, us);
                    }
                }
            }
            // Leave the layer on the winner (try_algorithm leaves it on the last one tried).
            self.use_algorithm(i, best)
                .map_err(|e| EngineError::Run(format!("layer {i}: {e}")))?;
            report.push(TunedConv {
                layer: i,
                heuristic,
                heuristic_us,
                chosen: best,
                chosen_us: best_us,
            });
        }
        self.handles.synchronize().map_err(run_err)?;
        self.fit_workspace().map_err(run_err)?;
        Ok(report)
    }

    /// Shrinks the workspace to what the chosen algorithms need (trying others may have
    /// grown it).
    fn fit_workspace(&mut self) -> Result<(), GpuOpsError> {
        let need = self
            .layers
            .iter()
            .filter_map(|l| match l {
                Layer::Conv { op, .. } => Some(op.workspace_bytes()),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        if need.max(1) < self.workspace.len() {
            self.workspace = self.handles.zeros::<u8>(need)?;
        }
        Ok(())
    }

    /// Applies a choice made earlier (by another session of the same loader and batch).
    pub(super) fn apply_tuned(&mut self, tuned: &[(usize, ConvAlgo)]) -> Result<(), EngineError> {
        for &(i, algo) in tuned {
            self.use_algorithm(i, algo)
                .map_err(|e| EngineError::Run(format!("layer {i}: {e}")))?;
        }
        Ok(())
    }

    fn conv_algorithm(&self, i: usize) -> ConvAlgo {
        match &self.layers[i] {
            Layer::Conv { op, .. } => op.algorithm(),
            _ => ConvAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        }
    }

    /// Switches conv `i` to `algo`, growing the workspace if it needs more.
    fn use_algorithm(&mut self, i: usize, algo: ConvAlgo) -> Result<(), GpuOpsError> {
        let need = match &mut self.layers[i] {
            Layer::Conv { op, .. } => set_algorithm(op, &self.handles, algo)?,
            _ => return Ok(()),
        };
        if need > self.workspace.len() {
            self.workspace = self.handles.zeros::<u8>(need)?;
        }
        Ok(())
    }

    /// Device time of conv `i` with `algo`, None where cuDNN refuses it (or it needs more
    /// workspace than the cap).
    fn try_algorithm(&mut self, i: usize, algo: ConvAlgo, timer: &Timer) -> Option<f64> {
        let need = match &mut self.layers[i] {
            Layer::Conv { op, .. } => set_algorithm(op, &self.handles, algo).ok()?,
            _ => return None,
        };
        if need > WORKSPACE_CAP {
            return None;
        }
        if need > self.workspace.len() {
            self.workspace = self.handles.zeros::<u8>(need).ok()?;
        }
        // An eager launch first: NOT_SUPPORTED shows here, outside any capture.
        self.run_layer(i).ok()?;
        self.handles.synchronize().ok()?;
        self.time_layer(i, timer).ok().map(|(us, _)| us)
    }

    /// Per-layer device time (each layer in a graph of its own) and the whole graph's
    /// replay time, on a pseudo-random input.
    pub fn profile_layers(&mut self) -> Result<Profile, EngineError> {
        self.fill_measure_input()?;
        let timer = self.handles.timer().map_err(run_err)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let (us, graph) = self
                .time_layer(i, &timer)
                .map_err(|e| EngineError::Run(format!("timing layer {i}: {e}")))?;
            let (kernels, other) = graph.node_counts().map_err(run_err)?;
            layers.push(LayerTime {
                layer: self.layers[i].describe(),
                kernels: kernels / REPS,
                other_nodes: other / REPS,
                us,
            });
        }
        let (mut graph_us, mut graph_kernels, mut graph_other_nodes) = (None, 0, 0);
        if let Some(mut graph) = self.graph.take() {
            let timed = (|| -> Result<(f64, (usize, usize)), GpuOpsError> {
                for _ in 0..REPS {
                    self.handles.replay(&mut graph)?;
                }
                self.handles.timer_start(&timer)?;
                for _ in 0..REPS {
                    self.handles.replay(&mut graph)?;
                }
                let ms = self.handles.timer_stop(&timer)?;
                Ok((ms * 1e3 / REPS as f64, graph.node_counts()?))
            })();
            self.graph = Some(graph);
            let (us, (k, o)) = timed.map_err(run_err)?;
            (graph_us, graph_kernels, graph_other_nodes) = (Some(us), k, o);
        }
        Ok(Profile {
            layers,
            graph_us,
            graph_kernels,
            graph_other_nodes,
        })
    }
}

fn set_algorithm(
    op: &mut ConvOp,
    h: &hacserve_ffi::gpu::ops::Handles,
    algo: ConvAlgo,
) -> Result<usize, GpuOpsError> {
    match op {
        ConvOp::F32(op) => op.set_algorithm(h, algo),
        ConvOp::F16(op) => op.set_algorithm(h, algo),
    }
}

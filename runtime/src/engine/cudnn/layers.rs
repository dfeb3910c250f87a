//! The layers a session is made of: one launch per plan step (plus, under FP16, the input's
//! conversion to f16 NHWC first), each holding its cuDNN/cuBLAS descriptors and chosen
//! algorithm. [`layer_for`] builds one from a [`Step`]; the session queues them on its stream
//! (`CudnnSession::run_layer`) eagerly or once, into the CUDA graph it replays. Layers know
//! the plan and the weights' layout, not the session: what a launch reads comes in as
//! [`Operands`].

use std::sync::Arc;

use hacserve_ffi::gpu::cuda::cu;
use hacserve_ffi::gpu::ops::{
    f16, ConvAlgo, ConvLayer, ConvMath, GemmLayer, GpuOpsError, HalfKernels, Handles, PoolLayer,
};

use super::plan::{Plan, Step};
use super::run_err;
use super::weights::{padded_channels, DevBuf};
use crate::engine::EngineError;

pub(super) enum ConvOp {
    F32(ConvLayer<f32>),
    F16(ConvLayer<f16>),
}

impl ConvOp {
    pub(super) fn algorithm(&self) -> ConvAlgo {
        match self {
            ConvOp::F32(op) => op.algorithm(),
            ConvOp::F16(op) => op.algorithm(),
        }
    }

    pub(super) fn relu(&self) -> bool {
        match self {
            ConvOp::F32(op) => op.relu(),
            ConvOp::F16(op) => op.relu(),
        }
    }

    pub(super) fn workspace_bytes(&self) -> usize {
        match self {
            ConvOp::F32(op) => op.workspace_bytes(),
            ConvOp::F16(op) => op.workspace_bytes(),
        }
    }

    pub(super) fn candidate_algorithms(&self) -> Vec<ConvAlgo> {
        match self {
            ConvOp::F32(op) => op.candidate_algorithms(),
            ConvOp::F16(op) => op.candidate_algorithms(),
        }
    }

    pub(super) fn fall_back(&mut self, h: &Handles) -> Result<usize, GpuOpsError> {
        match self {
            ConvOp::F32(op) => op.fall_back(h),
            ConvOp::F16(op) => op.fall_back(h),
        }
    }
}

pub(super) enum PoolOp {
    F32(PoolLayer<f32>),
    F16(PoolLayer<f16>),
}

pub(super) enum Layer {
    /// FP16 only, first: the f32 NCHW staging buffer -> tensor 0 (f16 NHWC, padded channels).
    ToHalf {
        kernels: Arc<HalfKernels>,
        dims: [usize; 4],
        cp: usize,
        y: usize,
    },
    Conv {
        op: ConvOp,
        x: usize,
        y: usize,
        z: Option<usize>,
        weight: usize,
        bias: usize,
        name: String,
    },
    Pool {
        op: PoolOp,
        x: usize,
        y: usize,
    },
    Gemm {
        op: GemmLayer,
        x: usize,
        y: usize,
        weight: usize,
        bias_rows: cu::CudaSlice<f32>,
        /// FP16: the f16 features converted to f32 here first (kernels, m * k buffer).
        to_f32: Option<(Arc<HalfKernels>, cu::CudaSlice<f32>)>,
    },
}

/// The launch for one plan step, with its descriptors made and its algorithm chosen. Marks
/// the tensors that stay f32 under FP16 (the classifier's output) in `f32_tensors` and raises
/// `workspace` to what the step needs.
pub(super) fn layer_for(
    step: &Step,
    plan: &Plan,
    handles: &Handles,
    math: ConvMath,
    half: &Option<Arc<HalfKernels>>,
    f32_tensors: &mut [bool],
    workspace: &mut usize,
) -> Result<Layer, EngineError> {
    let fp16 = half.is_some();
    let layer = match step {
        Step::Conv {
            name,
            x,
            y,
            z,
            weight,
            bias,
            geometry,
            relu,
        } => {
            let conv_err = |e: GpuOpsError| EngineError::Run(format!("conv {name}: {e}"));
            let op = if fp16 {
                let mut g = *geometry;
                if *x == 0 {
                    g.x[1] = padded_channels(g.x[1]);
                }
                ConvOp::F16(
                    ConvLayer::<f16>::new(handles, &g, *relu, z.is_some(), math)
                        .map_err(conv_err)?,
                )
            } else {
                ConvOp::F32(
                    ConvLayer::<f32>::new(handles, geometry, *relu, z.is_some(), math)
                        .map_err(conv_err)?,
                )
            };
            *workspace = (*workspace).max(op.workspace_bytes());
            Layer::Conv {
                op,
                x: *x,
                y: *y,
                z: *z,
                weight: *weight,
                bias: *bias,
                name: name.clone(),
            }
        }
        Step::MaxPool {
            x,
            y,
            kernel,
            stride,
            pad,
        } => Layer::Pool {
            op: if fp16 {
                PoolOp::F16(
                    PoolLayer::max(handles, plan.shapes[*x], *kernel, *stride, *pad)
                        .map_err(run_err)?,
                )
            } else {
                PoolOp::F32(
                    PoolLayer::max(handles, plan.shapes[*x], *kernel, *stride, *pad)
                        .map_err(run_err)?,
                )
            },
            x: *x,
            y: *y,
        },
        Step::GlobalAveragePool { x, y } => Layer::Pool {
            op: if fp16 {
                PoolOp::F16(PoolLayer::global_average(handles, plan.shapes[*x]).map_err(run_err)?)
            } else {
                PoolOp::F32(PoolLayer::global_average(handles, plan.shapes[*x]).map_err(run_err)?)
            },
            x: *x,
            y: *y,
        },
        Step::Gemm {
            x,
            y,
            weight,
            bias,
            k,
            n,
        } => {
            let batch = plan.shapes[*x][0];
            let rows: Vec<f32> = plan.params[*bias]
                .iter()
                .copied()
                .cycle()
                .take(batch * n)
                .collect();
            let mut bias_rows = handles.zeros::<f32>(rows.len()).map_err(run_err)?;
            handles.upload(&rows, &mut bias_rows).map_err(run_err)?;
            f32_tensors[*y] = true;
            let to_f32 = match half {
                Some(kernels) => Some((
                    kernels.clone(),
                    handles.zeros::<f32>(batch * k).map_err(run_err)?,
                )),
                None => None,
            };
            Layer::Gemm {
                op: GemmLayer::new(batch, *k, *n).map_err(run_err)?,
                x: *x,
                y: *y,
                weight: *weight,
                bias_rows,
                to_f32,
            }
        }
    };
    Ok(layer)
}

/// What a layer's launch reads besides its own descriptors: the session's activation
/// buffers (the output's taken out, see [`Layer::launch`]), FP16 staging input, zero
/// residual, and the shared weights.
pub(super) struct Operands<'a> {
    pub buffers: &'a [Option<DevBuf>],
    pub staging: Option<&'a cu::CudaSlice<f32>>,
    pub zeros: &'a DevBuf,
    pub weights: &'a [DevBuf],
}

impl Layer {
    /// The tensor this layer writes.
    pub(super) fn output(&self) -> usize {
        match self {
            Layer::Conv { y, .. }
            | Layer::Pool { y, .. }
            | Layer::Gemm { y, .. }
            | Layer::ToHalf { y, .. } => *y,
        }
    }

    /// Names the layer in an error.
    pub(super) fn describe(&self) -> String {
        match self {
            Layer::Conv { name, op, .. } => format!("conv {name} ({:?})", op.algorithm()),
            Layer::Pool { .. } => "pooling".to_string(),
            Layer::Gemm { .. } => "gemm".to_string(),
            Layer::ToHalf { .. } => "input to f16 NHWC".to_string(),
        }
    }

    /// A conv whose algorithm is not the always-supported IMPLICIT_PRECOMP_GEMM yet.
    pub(super) fn can_fall_back(&self) -> bool {
        matches!(self, Layer::Conv { op, .. }
            if op.algorithm() != ConvAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM)
    }

    /// (conv node name, cuDNN algorithm, activation, workspace bytes) of a conv, for logs.
    pub(super) fn conv_info(&self) -> Option<(String, String, &'static str, usize)> {
        match self {
            Layer::Conv { op, name, .. } => Some((
                name.clone(),
                format!("{:?}", op.algorithm()),
                if op.relu() { "relu" } else { "identity" },
                op.workspace_bytes(),
            )),
            _ => None,
        }
    }

    /// Queues layer `i` on the stream, writing `out` (taken out of the session's buffers by
    /// the caller, so that the inputs can be borrowed at the same time).
    pub(super) fn launch(
        &mut self,
        i: usize,
        handles: &mut Handles,
        operands: &Operands<'_>,
        workspace: &mut cu::CudaSlice<u8>,
        out: &mut DevBuf,
    ) -> Result<(), GpuOpsError> {
        let Operands {
            buffers,
            staging,
            zeros,
            weights,
        } = *operands;
        let missing = |what: &str, ix: usize| GpuOpsError::Geometry(format!("{what} {ix} missing"));
        let buf = |t: usize| {
            buffers
                .get(t)
                .and_then(Option::as_ref)
                .ok_or_else(|| missing("tensor", t))
        };
        let param = |p: usize| weights.get(p).ok_or_else(|| missing("parameter", p));
        match self {
            Layer::ToHalf {
                kernels, dims, cp, ..
            } => {
                let src = staging.ok_or_else(|| missing("staging buffer", 0))?;
                let DevBuf::F16(out) = out else {
                    return Err(missing("f16 input tensor", 0));
                };
                kernels.nchw_to_nhwc(handles, src, *dims, *cp, out)
            }
            Layer::Conv {
                op,
                x,
                z,
                weight,
                bias,
                ..
            } => {
                let z = match z {
                    Some(t) => buf(*t)?,
                    None => zeros,
                };
                match (op, out) {
                    (ConvOp::F32(op), DevBuf::F32(out)) => op.launch(
                        handles,
                        buf(*x)?.f32s()?,
                        param(*weight)?.f32s()?,
                        param(*bias)?.f32s()?,
                        z.f32s()?,
                        workspace,
                        out,
                    ),
                    (ConvOp::F16(op), DevBuf::F16(out)) => op.launch(
                        handles,
                        buf(*x)?.f16s()?,
                        param(*weight)?.f16s()?,
                        param(*bias)?.f16s()?,
                        z.f16s()?,
                        workspace,
                        out,
                    ),
                    _ => Err(missing("conv output of the layer's type", i)),
                }
            }
            Layer::Pool { op, x, .. } => match (op, out) {
                (PoolOp::F32(op), DevBuf::F32(out)) => op.launch(handles, buf(*x)?.f32s()?, out),
                (PoolOp::F16(op), DevBuf::F16(out)) => op.launch(handles, buf(*x)?.f16s()?, out),
                _ => Err(missing("pool output of the layer's type", i)),
            },
            Layer::Gemm {
                op,
                x,
                weight,
                bias_rows,
                to_f32,
                ..
            } => {
                let DevBuf::F32(out) = out else {
                    return Err(missing("f32 gemm output", i));
                };
                match to_f32 {
                    Some((kernels, features)) => {
                        let len = features.len();
                        kernels.to_f32(handles, buf(*x)?.f16s()?, len, features)?;
                        op.launch(handles, features, param(*weight)?.f32s()?, bias_rows, out)
                    }
                    None => op.launch(
                        handles,
                        buf(*x)?.f32s()?,
                        param(*weight)?.f32s()?,
                        bias_rows,
                        out,
                    ),
                }
            }
        }
    }
}

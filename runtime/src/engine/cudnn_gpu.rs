//! GPU backend on cuDNN + cuBLAS (first cut): reads the same ONNX ResNets as the CPU backend,
//! folds BatchNormalization into the convolutions, fuses ReLU and the residual Add into
//! `cudnnConvolutionBiasActivationForward`, and runs FP32 NCHW (or, with [`Precision::Fp16`],
//! FP16 NHWC on tensor cores) on one stream per session.
//!
//! Two steps:
//! * [`Plan::from_proto`] (no GPU): walks the ONNX nodes in order and produces a list of
//!   [`Step`]s over numbered activation tensors, with folded host weights. Supported: Conv
//!   (group 1, dilation 1, symmetric pads), BatchNormalization (after a Conv), Relu (after a
//!   Conv or a fused Add), Add (one operand produced by a Conv), MaxPool, GlobalAveragePool,
//!   Flatten (axis 1), Gemm (transA 0). Anything else is [`EngineError::BadModel`] naming it.
//! * [`CudnnLoader`] uploads the weights once; each [`CudnnSession`] builds its own stream,
//!   cuDNN/cuBLAS handles, descriptors, algorithm choice, activation buffers and workspace, so
//!   `infer` allocates nothing: copy in, one launch per step, copy the logits out.
//!
//! Fusion onto cuDNN, per conv step: y = act(conv(x, w') + b' + alpha2 * z), where w', b' carry
//! the folded BN; act = RELU when a Relu follows (directly, or after the Add), else IDENTITY
//! (then cuDNN only supports IMPLICIT_PRECOMP_GEMM); z = the shortcut tensor with alpha2 = 1 when
//! an Add consumes the conv output, else a zero buffer with alpha2 = 0.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use hacserve_ffi::gpu::cuda::cu;
use hacserve_ffi::gpu::ops::{
    self as gpu_ops, f16, ConvAlgo, ConvGeometry, ConvLayer, ConvMath, GemmLayer, GpuDevice,
    GpuOpsError, Graph, HalfKernels, Handles, PoolLayer,
};
use prost::Message;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    type_proto, GraphProto, ModelProto, NodeProto, TensorProto,
};

use super::gpu_images::{GpuImageKernels, GpuImages};
use super::{DeviceImages, EngineError, EngineLoader, InferenceEngine};

/// Used when the model does not say: the ImageNet layout.
const DEFAULT_CHW: [usize; 3] = [3, 224, 224];

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

/// Channels of the FP16 input tensor: a multiple of 8 (tensor-core kernels want it).
fn padded_channels(c: usize) -> usize {
    c.div_ceil(8) * 8
}

/// A device buffer of either element type.
enum DevBuf {
    F32(cu::CudaSlice<f32>),
    F16(cu::CudaSlice<f16>),
}

impl DevBuf {
    fn f32s(&self) -> Result<&cu::CudaSlice<f32>, GpuOpsError> {
        match self {
            DevBuf::F32(b) => Ok(b),
            DevBuf::F16(_) => Err(GpuOpsError::Geometry("f16 buffer where f32 needed".into())),
        }
    }

    fn f16s(&self) -> Result<&cu::CudaSlice<f16>, GpuOpsError> {
        match self {
            DevBuf::F16(b) => Ok(b),
            DevBuf::F32(_) => Err(GpuOpsError::Geometry("f32 buffer where f16 needed".into())),
        }
    }
}

/// KCRS f32 weights -> KRSC f16 with the input channels zero-padded to `cp`.
fn to_krsc_half(w: &[f32], g: &ConvGeometry, cp: usize) -> Vec<f16> {
    let (k, c, r, sx) = (g.cout, g.x[1], g.kernel[0], g.kernel[1]);
    let mut out = vec![f16::ZERO; k * r * sx * cp];
    for ko in 0..k {
        for ci in 0..c {
            for ri in 0..r {
                for si in 0..sx {
                    out[((ko * r + ri) * sx + si) * cp + ci] =
                        f16::from_f32(w[((ko * c + ci) * r + ri) * sx + si]);
                }
            }
        }
    }
    out
}

/// One launch of the plan. Tensor ids index [`Plan::shapes`]; param ids index
/// [`Plan::params`].
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Conv {
        name: String,
        x: usize,
        y: usize,
        /// Residual added before the activation (a fused Add).
        z: Option<usize>,
        weight: usize,
        bias: usize,
        geometry: ConvGeometry,
        relu: bool,
    },
    MaxPool {
        x: usize,
        y: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        pad: [usize; 2],
    },
    GlobalAveragePool {
        x: usize,
        y: usize,
    },
    /// y[N, n] = x[N, k] * w[n, k]^T + bias
    Gemm {
        x: usize,
        y: usize,
        weight: usize,
        bias: usize,
        k: usize,
        n: usize,
    },
}

/// The model as launches over numbered tensors, with host weights (BN folded). GPU-free.
#[derive(Debug, Clone)]
pub struct Plan {
    pub input_name: String,
    /// Shape of every tensor, [N, C, H, W] ([N, K, 1, 1] for flattened ones); 0 is the input.
    pub shapes: Vec<[usize; 4]>,
    pub steps: Vec<Step>,
    pub params: Vec<Vec<f32>>,
    pub output: usize,
}

fn bad(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::BadModel {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn run_err(e: GpuOpsError) -> EngineError {
    EngineError::Run(e.to_string())
}

/// Float values of an initializer (float_data or little-endian raw_data).
fn tensor_values(t: &TensorProto) -> Result<Vec<f32>, String> {
    if t.data_type != DataType::Float as i32 {
        return Err(format!(
            "initializer {} has data type {}, want float",
            t.name, t.data_type
        ));
    }
    if t.data_location == Some(1) {
        return Err(format!("initializer {} uses external data", t.name));
    }
    let want: usize = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
        .try_fold(1usize, |a, d| a.checked_mul(d))
        .ok_or_else(|| format!("initializer {} has bad dims {:?}", t.name, t.dims))?;
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        if t.raw_data.len() % 4 != 0 {
            return Err(format!(
                "initializer {} raw_data not a multiple of 4",
                t.name
            ));
        }
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        t.float_data.clone()
    };
    if values.len() != want {
        return Err(format!(
            "initializer {} has {} values, dims {:?} say {want}",
            t.name,
            values.len(),
            t.dims
        ));
    }
    Ok(values)
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a tract_onnx::pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

fn attr_int(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name)
        .filter(|a| a.r#type == AttributeType::Int as i32 || a.r#type == 0)
        .map(|a| a.i)
        .unwrap_or(default)
}

fn attr_float(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name)
        .filter(|a| a.r#type == AttributeType::Float as i32 || a.r#type == 0)
        .map(|a| a.f)
        .unwrap_or(default)
}

/// Where a tensor name points: an activation tensor, and for the most recent conv output not yet
/// consumed by anything but fusable ops, which step produced it.
#[derive(Debug, Clone, Copy)]
struct Value {
    tensor: usize,
    /// Step index of the conv that writes this tensor and can still absorb BN/Relu/Add.
    conv: Option<usize>,
}

struct Builder<'a> {
    path: &'a Path,
    inits: HashMap<&'a str, &'a TensorProto>,
    values: HashMap<String, Value>,
    consumers: HashMap<&'a str, usize>,
    plan: Plan,
}

impl<'a> Builder<'a> {
    fn err(&self, node: &NodeProto, reason: impl std::fmt::Display) -> EngineError {
        bad(
            self.path,
            format!("{} node {:?}: {reason}", node.op_type, node.name),
        )
    }

    fn input(&self, node: &NodeProto, ix: usize) -> Result<Value, EngineError> {
        let name = node
            .input
            .get(ix)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| self.err(node, format!("missing input {ix}")))?;
        self.values
            .get(name)
            .copied()
            .ok_or_else(|| self.err(node, format!("input {name:?} is not computed before it")))
    }

    fn init(&self, node: &NodeProto, ix: usize) -> Result<(Vec<i64>, Vec<f32>), EngineError> {
        let name = node
            .input
            .get(ix)
            .ok_or_else(|| self.err(node, format!("missing input {ix}")))?;
        let t = self
            .inits
            .get(name.as_str())
            .ok_or_else(|| self.err(node, format!("input {name:?} is not an initializer")))?;
        let values = tensor_values(t).map_err(|e| self.err(node, e))?;
        Ok((t.dims.clone(), values))
    }

    fn output_name(&self, node: &NodeProto) -> Result<String, EngineError> {
        match node.output.as_slice() {
            [one] => Ok(one.clone()),
            [one, rest @ ..] if rest.iter().all(|o| o.is_empty()) => Ok(one.clone()),
            _ => Err(self.err(node, "only one output is supported")),
        }
    }

    fn single_consumer(&self, node: &NodeProto, ix: usize) -> bool {
        node.input
            .get(ix)
            .and_then(|n| self.consumers.get(n.as_str()))
            .copied()
            == Some(1)
    }

    fn new_tensor(&mut self, shape: [usize; 4]) -> usize {
        self.plan.shapes.push(shape);
        self.plan.shapes.len() - 1
    }

    fn param(&mut self, values: Vec<f32>) -> usize {
        self.plan.params.push(values);
        self.plan.params.len() - 1
    }

    fn pair(
        &self,
        node: &NodeProto,
        name: &str,
        default: usize,
    ) -> Result<[usize; 2], EngineError> {
        match attr_ints(node, name) {
            None => Ok([default, default]),
            Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 0) => {
                Ok([v[0] as usize, v[1] as usize])
            }
            Some(v) => Err(self.err(node, format!("{name} {v:?} unsupported (want 2 values)"))),
        }
    }

    /// ONNX pads [top, left, bottom, right] -> [ph, pw], symmetric only.
    fn pads(&self, node: &NodeProto) -> Result<[usize; 2], EngineError> {
        if let Some(a) = attr(node, "auto_pad") {
            let mode = String::from_utf8_lossy(&a.s);
            if mode != "NOTSET" && !mode.is_empty() {
                return Err(self.err(node, format!("auto_pad {mode} unsupported")));
            }
        }
        match attr_ints(node, "pads") {
            None => Ok([0, 0]),
            Some(p)
                if p.len() == 4 && p[0] == p[2] && p[1] == p[3] && p.iter().all(|&v| v >= 0) =>
            {
                Ok([p[0] as usize, p[1] as usize])
            }
            Some(p) => Err(self.err(node, format!("pads {p:?} unsupported (want symmetric 2-D)"))),
        }
    }

    fn conv(&mut self, node: &NodeProto) -> Result<(), EngineError> {
        let x = self.input(node, 0)?;
        let xs = self.plan.shapes[x.tensor];
        let (wd, w) = self.init(node, 1)?;
        if attr_int(node, "group", 1) != 1 {
            return Err(self.err(node, "group != 1 unsupported"));
        }
        if self.pair(node, "dilations", 1)? != [1, 1] {
            return Err(self.err(node, "dilation != 1 unsupported"));
        }
        if wd.len() != 4 || wd.iter().any(|&d| d <= 0) || wd[1] as usize != xs[1] {
            return Err(self.err(node, format!("weight dims {wd:?} do not fit input {xs:?}")));
        }
        let cout = wd[0] as usize;
        let kernel = [wd[2] as usize, wd[3] as usize];
        if let Some(k) = attr_ints(node, "kernel_shape") {
            if k.len() != 2 || k[0] as usize != kernel[0] || k[1] as usize != kernel[1] {
                return Err(self.err(node, format!("kernel_shape {k:?} != weight dims {wd:?}")));
            }
        }
        let geometry = ConvGeometry {
            x: xs,
            cout,
            kernel,
            stride: self.pair(node, "strides", 1)?,
            pad: self.pads(node)?,
        };
        let y_shape = geometry.output().map_err(|e| self.err(node, e))?;
        let bias = if node.input.len() > 2 && !node.input[2].is_empty() {
            let (_, b) = self.init(node, 2)?;
            if b.len() != cout {
                return Err(self.err(node, format!("bias has {} values, want {cout}", b.len())));
            }
            b
        } else {
            vec![0.0; cout]
        };
        let y = self.new_tensor(y_shape);
        let weight = self.param(w);
        let bias = self.param(bias);
        self.plan.steps.push(Step::Conv {
            name: node.name.clone(),
            x: x.tensor,
            y,
            z: None,
            weight,
            bias,
            geometry,
            relu: false,
        });
        let out = self.output_name(node)?;
        self.values.insert(
            out,
            Value {
                tensor: y,
                conv: Some(self.plan.steps.len() - 1),
            },
        );
        Ok(())
    }

    /// The conv step that `node`'s input `ix` comes straight from and that nothing else reads.
    fn fusable_conv(&self, node: &NodeProto, ix: usize) -> Result<Option<usize>, EngineError> {
        let v = self.input(node, ix)?;
        Ok(v.conv.filter(|_| self.single_consumer(node, ix)))
    }

    fn batch_norm(&mut self, node: &NodeProto) -> Result<(), EngineError> {
        let Some(step) = self.fusable_conv(node, 0)? else {
            return Err(self.err(node, "only supported right after a Conv it alone reads"));
        };
        let eps = attr_float(node, "epsilon", 1e-5);
        let mut stats = Vec::with_capacity(4);
        for ix in 1..5 {
            stats.push(self.init(node, ix)?.1);
        }
        let (gamma, beta, mean, var) = (&stats[0], &stats[1], &stats[2], &stats[3]);
        let Step::Conv {
            weight,
            bias,
            geometry,
            relu,
            z,
            ..
        } = &self.plan.steps[step]
        else {
            return Err(self.err(node, "internal: not a conv step"));
        };
        if *relu || z.is_some() {
            return Err(self.err(node, "BatchNormalization after an activation unsupported"));
        }
        let cout = geometry.cout;
        if stats.iter().any(|s| s.len() != cout) {
            return Err(self.err(node, format!("statistics are not {cout} values")));
        }
        let (weight, bias) = (*weight, *bias);
        let per_out = self.plan.params[weight].len() / cout;
        // w' = w * gamma / sqrt(var + eps); b' = beta + (b - mean) * gamma / sqrt(var + eps),
        // computed in f64.
        let scale: Vec<f64> = (0..cout)
            .map(|c| f64::from(gamma[c]) / (f64::from(var[c]) + f64::from(eps)).sqrt())
            .collect();
        for (c, row) in self.plan.params[weight].chunks_mut(per_out).enumerate() {
            for v in row {
                *v = (f64::from(*v) * scale[c]) as f32;
            }
        }
        for (c, b) in self.plan.params[bias].iter_mut().enumerate() {
            *b = (f64::from(beta[c]) + (f64::from(*b) - f64::from(mean[c])) * scale[c]) as f32;
        }
        let v = self.input(node, 0)?;
        let out = self.output_name(node)?;
        self.values.insert(out, v);
        Ok(())
    }

    fn relu(&mut self, node: &NodeProto) -> Result<(), EngineError> {
        let Some(step) = self.fusable_conv(node, 0)? else {
            return Err(self.err(
                node,
                "only supported right after a Conv (or a residual Add) it alone reads",
            ));
        };
        if let Step::Conv { relu, .. } = &mut self.plan.steps[step] {
            if *relu {
                return Err(self.err(node, "two activations in a row"));
            }
            *relu = true;
        }
        let v = self.input(node, 0)?;
        let out = self.output_name(node)?;
        // After the activation nothing more can be fused into this conv.
        self.values.insert(
            out,
            Value {
                tensor: v.tensor,
                conv: None,
            },
        );
        Ok(())
    }

    fn add(&mut self, node: &NodeProto) -> Result<(), EngineError> {
        let a = self.input(node, 0)?;
        let b = self.input(node, 1)?;
        if self.plan.shapes[a.tensor] != self.plan.shapes[b.tensor] {
            return Err(self.err(
                node,
                format!(
                    "operand shapes differ: {:?} and {:?} (no broadcasting)",
                    self.plan.shapes[a.tensor], self.plan.shapes[b.tensor]
                ),
            ));
        }
        let fa = self.fusable_conv(node, 0)?;
        let fb = self.fusable_conv(node, 1)?;
        // Fuse into the later conv, so the other operand is computed before it runs.
        let (step, other) = match (fa, fb) {
            (Some(sa), Some(sb)) if sb > sa => (sb, a),
            (Some(sa), _) => (sa, b),
            (None, Some(sb)) => (sb, a),
            (None, None) => {
                return Err(self.err(
                    node,
                    "only supported when one operand comes straight from a Conv",
                ))
            }
        };
        let target = match &mut self.plan.steps[step] {
            Step::Conv { z, relu, y, .. } if z.is_none() && !*relu => {
                *z = Some(other.tensor);
                *y
            }
            _ => return Err(self.err(node, "operand conv already has an activation")),
        };
        if other.tensor == target {
            return Err(self.err(node, "x + x unsupported"));
        }
        let out = self.output_name(node)?;
        self.values.insert(
            out,
            Value {
                tensor: target,
                conv: Some(step),
            },
        );
        Ok(())
    }

    fn max_pool(&mut self, node: &NodeProto) -> Result<(), EngineError> {
        let x = self.input(node, 0)?;
        let xs = self.plan.shapes[x.tensor];
        if attr_int(node, "ceil_mode", 0) != 0 || attr_int(node, "storage_order", 0) != 0 {
            return Err(self.err(node, "ceil_mode / storage_order unsupported"));
        }
        if self.pair(node, "dilations", 1)? != [1, 1] {
            return Err(self.err(node, "dilation != 1 unsupported"));
        }
        let kernel = match attr_ints(node, "kernel_shape") {
            Some(k) if k.len() == 2 && k.iter().all(|&v| v > 0) => [k[0] as usize, k[1] as usize],
            k => return Err(self.err(node, format!("kernel_shape {k:?} unsupported"))),
        };
        let stride = self.pair(node, "strides", 1)?;
        let pad = self.pads(node)?;
        let out = |s: usize, k: usize, st: usize, p: usize| {
            (st > 0 && s + 2 * p >= k && p < k).then(|| (s + 2 * p - k) / st + 1)
        };
        let (Some(oh), Some(ow)) = (
            out(xs[2], kernel[0], stride[0], pad[0]),
            out(xs[3], kernel[1], stride[1], pad[1]),
        ) else {
            return Err(self.err(node, format!("window does not fit input {xs:?}")));
        };
        let y = self.new_tensor([xs[0], xs[1], oh, ow]);
        self.plan.steps.push(Step::MaxPool {
            x: x.tensor,
            y,
            kernel,
            stride,
            pad,
        });
        let out = self.output_name(node)?;
        self.values.insert(
            out,
            Value {
                tensor: y,
                conv: None,
            },
        );
        Ok(())
    }

    fn global_average_pool(&mut self, node: &NodeProto) -> Result<(), EngineError> {
        let x = self.input(node, 0)?;
        let xs = self.plan.shapes[x.tensor];
        let y = self.new_tensor([xs[0], xs[1], 1, 1]);
        self.plan
            .steps
            .push(Step::GlobalAveragePool { x: x.tensor, y });
        let out = self.output_name(node)?;
        self.values.insert(
            out,
            Value {
                tensor: y,
                conv: None,
            },
        );
        Ok(())
    }

    fn flatten(&mut self, node: &NodeProto) -> Result<(), EngineError> {
        if attr_int(node, "axis", 1) != 1 {
            return Err(self.err(node, "only axis 1 is supported"));
        }
        let x = self.input(node, 0)?;
        let [n, c, h, w] = self.plan.shapes[x.tensor];
        let out = self.output_name(node)?;
        // [N, C, 1, 1] is already [N, C] in memory: the same buffer under a new name. Other
        // shapes would need a reshaped view of the producer's buffer (not in this first cut).
        if h != 1 || w != 1 {
            return Err(self.err(
                node,
                format!("flatten of [{n}, {c}, {h}, {w}] unsupported (want H = W = 1)"),
            ));
        }
        let tensor = x.tensor;
        self.values.insert(out, Value { tensor, conv: None });
        Ok(())
    }

    fn gemm(&mut self, node: &NodeProto) -> Result<(), EngineError> {
        let x = self.input(node, 0)?;
        let [batch, k, h, w] = self.plan.shapes[x.tensor];
        if h != 1 || w != 1 {
            return Err(self.err(node, "input must be flat [N, K]"));
        }
        if attr_int(node, "transA", 0) != 0 {
            return Err(self.err(node, "transA unsupported"));
        }
        let alpha = attr_float(node, "alpha", 1.0);
        let beta = attr_float(node, "beta", 1.0);
        let trans_b = attr_int(node, "transB", 0) != 0;
        let (wd, mut wv) = self.init(node, 1)?;
        if wd.len() != 2 || wd.iter().any(|&d| d <= 0) {
            return Err(self.err(node, format!("weight dims {wd:?} unsupported")));
        }
        let (r, c) = (wd[0] as usize, wd[1] as usize);
        // Store as [n, k] (what transB = 1 means); transpose a [k, n] weight once here.
        let n = if trans_b {
            if c != k {
                return Err(self.err(node, format!("weight {wd:?} does not fit K = {k}")));
            }
            r
        } else {
            if r != k {
                return Err(self.err(node, format!("weight {wd:?} does not fit K = {k}")));
            }
            let mut t = vec![0.0; r * c];
            for i in 0..r {
                for j in 0..c {
                    t[j * r + i] = wv[i * c + j];
                }
            }
            wv = t;
            c
        };
        if alpha != 1.0 {
            wv.iter_mut().for_each(|v| *v *= alpha);
        }
        let bias = if node.input.len() > 2 && !node.input[2].is_empty() {
            let (bd, mut b) = self.init(node, 2)?;
            if b.len() != n {
                return Err(self.err(node, format!("bias dims {bd:?} unsupported (want {n})")));
            }
            b.iter_mut().for_each(|v| *v *= beta);
            b
        } else {
            vec![0.0; n]
        };
        let y = self.new_tensor([batch, n, 1, 1]);
        let weight = self.param(wv);
        let bias = self.param(bias);
        self.plan.steps.push(Step::Gemm {
            x: x.tensor,
            y,
            weight,
            bias,
            k,
            n,
        });
        let out = self.output_name(node)?;
        self.values.insert(
            out,
            Value {
                tensor: y,
                conv: None,
            },
        );
        Ok(())
    }
}

/// [batch, C, H, W] from the graph input (C, H, W default to 3, 224, 224 when not static).
fn input_shape(
    graph: &GraphProto,
    path: &Path,
    batch: usize,
) -> Result<(String, [usize; 4]), EngineError> {
    let inits: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(bad(
            path,
            format!("want 1 graph input, model has {}", inputs.len()),
        ));
    };
    let tensor = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => Some(t),
        _ => None,
    };
    if let Some(t) = tensor {
        if t.elem_type != DataType::Float as i32 && t.elem_type != 0 {
            return Err(bad(
                path,
                format!("input is element type {}, want float", t.elem_type),
            ));
        }
    }
    let dims: Vec<Option<usize>> = tensor
        .and_then(|t| t.shape.as_ref())
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(dimension::Value::DimValue(v)) if v > 0 => Some(v as usize),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let chw = match dims.len() {
        0 => DEFAULT_CHW,
        4 => [
            dims[1].unwrap_or(DEFAULT_CHW[0]),
            dims[2].unwrap_or(DEFAULT_CHW[1]),
            dims[3].unwrap_or(DEFAULT_CHW[2]),
        ],
        n => return Err(bad(path, format!("input has rank {n}, want 4 (NCHW)"))),
    };
    Ok((input.name.clone(), [batch, chw[0], chw[1], chw[2]]))
}

impl Plan {
    /// Reads and plans the ONNX file at `path` for `batch` images.
    pub fn load(path: &Path, batch: usize) -> Result<Self, EngineError> {
        let bytes = std::fs::read(path).map_err(|source| EngineError::ModelFile {
            path: path.display().to_string(),
            source,
        })?;
        let proto = ModelProto::decode(bytes.as_slice())
            .map_err(|e| bad(path, format!("not an ONNX protobuf: {e}")))?;
        Self::from_proto(&proto, path, batch)
    }

    /// Plans an in-memory model; `path` only names it in errors. No GPU involved.
    pub fn from_proto(proto: &ModelProto, path: &Path, batch: usize) -> Result<Self, EngineError> {
        if batch == 0 {
            return Err(bad(path, "batch must be at least 1"));
        }
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| bad(path, "no graph in the model"))?;
        // Name every unsupported op up front, like the CPU backend does.
        let supported = [
            "Conv",
            "BatchNormalization",
            "Relu",
            "Add",
            "MaxPool",
            "GlobalAveragePool",
            "Flatten",
            "Gemm",
        ];
        let mut missing: Vec<String> = graph
            .node
            .iter()
            .filter(|n| {
                !(n.domain.is_empty() || n.domain == "ai.onnx")
                    || !supported.contains(&n.op_type.as_str())
            })
            .map(|n| {
                if n.domain.is_empty() {
                    n.op_type.clone()
                } else {
                    format!("{}.{}", n.domain, n.op_type)
                }
            })
            .collect();
        missing.sort();
        missing.dedup();
        if !missing.is_empty() {
            return Err(bad(
                path,
                format!(
                    "unsupported ONNX operator(s) for the cuDNN engine: {}",
                    missing.join(", ")
                ),
            ));
        }
        let (input_name, shape) = input_shape(graph, path, batch)?;
        let mut consumers: HashMap<&str, usize> = HashMap::new();
        for n in &graph.node {
            for i in &n.input {
                *consumers.entry(i.as_str()).or_default() += 1;
            }
        }
        for o in &graph.output {
            *consumers.entry(o.name.as_str()).or_default() += 1;
        }
        let mut b = Builder {
            path,
            inits: graph
                .initializer
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect(),
            values: HashMap::new(),
            consumers,
            plan: Plan {
                input_name: input_name.clone(),
                shapes: vec![shape],
                steps: Vec::new(),
                params: Vec::new(),
                output: 0,
            },
        };
        b.values.insert(
            input_name,
            Value {
                tensor: 0,
                conv: None,
            },
        );
        for node in &graph.node {
            match node.op_type.as_str() {
                "Conv" => b.conv(node)?,
                "BatchNormalization" => b.batch_norm(node)?,
                "Relu" => b.relu(node)?,
                "Add" => b.add(node)?,
                "MaxPool" => b.max_pool(node)?,
                "GlobalAveragePool" => b.global_average_pool(node)?,
                "Flatten" => b.flatten(node)?,
                "Gemm" => b.gemm(node)?,
                other => return Err(bad(path, format!("unsupported ONNX operator {other}"))),
            }
        }
        let out_name = graph
            .output
            .first()
            .map(|o| o.name.as_str())
            .ok_or_else(|| bad(path, "model has no output"))?;
        let out = b
            .values
            .get(out_name)
            .ok_or_else(|| bad(path, format!("output {out_name:?} is never computed")))?;
        let mut plan = b.plan;
        plan.output = out.tensor;
        if plan.output == 0 {
            return Err(bad(path, "the output is the input"));
        }
        Ok(plan)
    }

    pub fn input_shape(&self) -> [usize; 4] {
        self.shapes[0]
    }

    /// Values per image of the output.
    pub fn num_classes(&self) -> usize {
        let s = self.shapes[self.output];
        s[1] * s[2] * s[3]
    }
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
    /// ([`DeviceImages::run_slots`]). 1 = no dynamic batching.
    pub max_batch: usize,
}

impl Default for CudnnOptions {
    fn default() -> Self {
        CudnnOptions {
            batch: 1,
            precision: Precision::Tf32,
            cuda_graph: false,
            gpu_decode: false,
            max_batch: 1,
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
    /// The same model planned for `options.max_batch` images (dynamic batching).
    batch_plan: Option<Arc<Plan>>,
    options: CudnnOptions,
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
        let batch_plan = if options.gpu_decode && options.max_batch > 1 {
            let batched = Plan::load(path, options.max_batch)?;
            // Same ONNX, other batch: the parameters (and so the shared weights) match.
            let same = batched.params.len() == plan.params.len()
                && batched
                    .params
                    .iter()
                    .zip(&plan.params)
                    .all(|(a, b)| a.len() == b.len());
            if !same {
                return Err(bad(path, "batch plan differs from the batch-1 plan"));
            }
            Some(Arc::new(batched))
        } else {
            None
        };
        let gpu = GpuDevice::open(device).map_err(run_err)?;
        let fp16 = options.precision == Precision::Fp16;
        // FP16: conv weights (KRSC, input channels of the first conv padded) and biases go
        // to the GPU as f16; the classifier's weights stay f32.
        let mut half_params: HashMap<usize, Vec<f16>> = HashMap::new();
        if fp16 {
            for step in &plan.steps {
                if let Step::Conv {
                    x,
                    weight,
                    bias,
                    geometry,
                    ..
                } = step
                {
                    let cp = if *x == 0 {
                        padded_channels(geometry.x[1])
                    } else {
                        geometry.x[1]
                    };
                    half_params.insert(*weight, to_krsc_half(&plan.params[*weight], geometry, cp));
                    half_params.insert(
                        *bias,
                        plan.params[*bias]
                            .iter()
                            .map(|&v| f16::from_f32(v))
                            .collect(),
                    );
                }
            }
        }
        let weights = plan
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| match half_params.get(&i) {
                Some(h) => gpu.upload(h).map(DevBuf::F16),
                None => gpu.upload(p).map(DevBuf::F32),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(run_err)?;
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
        Ok(CudnnLoader {
            device: Arc::new(gpu),
            plan: Arc::new(plan),
            weights: Arc::new(weights),
            half,
            images,
            batch_plan,
            options,
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

enum ConvOp {
    F32(ConvLayer<f32>),
    F16(ConvLayer<f16>),
}

impl ConvOp {
    fn algorithm(&self) -> ConvAlgo {
        match self {
            ConvOp::F32(op) => op.algorithm(),
            ConvOp::F16(op) => op.algorithm(),
        }
    }

    fn relu(&self) -> bool {
        match self {
            ConvOp::F32(op) => op.relu(),
            ConvOp::F16(op) => op.relu(),
        }
    }

    fn workspace_bytes(&self) -> usize {
        match self {
            ConvOp::F32(op) => op.workspace_bytes(),
            ConvOp::F16(op) => op.workspace_bytes(),
        }
    }

    fn fall_back(&mut self, h: &Handles) -> Result<usize, GpuOpsError> {
        match self {
            ConvOp::F32(op) => op.fall_back(h),
            ConvOp::F16(op) => op.fall_back(h),
        }
    }
}

enum PoolOp {
    F32(PoolLayer<f32>),
    F16(PoolLayer<f16>),
}

enum Layer {
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

/// One worker's GPU context: its own stream, handles, descriptors and buffers.
pub struct CudnnSession {
    handles: Handles,
    layers: Vec<Layer>,
    /// One buffer per plan tensor (fused ops write into their conv's buffer).
    buffers: Vec<Option<DevBuf>>,
    /// FP16: where `run` uploads the f32 NCHW input (the first layer converts it).
    staging: Option<cu::CudaSlice<f32>>,
    /// The host input (page-locked: the upload is an asynchronous DMA).
    host_input: cu::PinnedHostSlice<f32>,
    /// nvJPEG + preprocessing kernel, with [`CudnnOptions::gpu_decode`].
    images: Option<GpuImages>,
    /// Dynamic batching: the batch-`max_batch` context JPEGs are staged into, and where its
    /// logits land before the first `n` images' are handed out.
    batched: Option<Box<CudnnSession>>,
    batch_logits: Vec<f32>,
    high_priority: bool,
    /// z for convs without a residual (weighted by 0, kept finite).
    zeros: DevBuf,
    workspace: cu::CudaSlice<u8>,
    weights: Arc<Vec<DevBuf>>,
    input_shape: [usize; 4],
    output: usize,
    num_classes: usize,
    batch: usize,
    graph: Option<Graph>,
}

impl CudnnSession {
    fn new(loader: &CudnnLoader, high_priority: bool) -> Result<Self, EngineError> {
        let mut session = Self::build(loader, &loader.plan, high_priority, true)?;
        if let Some(plan) = &loader.batch_plan {
            let batched = Self::build(loader, plan, high_priority, false)?;
            session.batch_logits = vec![0.0; batched.batch * batched.num_classes];
            session.batched = Some(Box::new(batched));
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
                            ConvLayer::<f16>::new(&handles, &g, *relu, z.is_some(), math)
                                .map_err(conv_err)?,
                        )
                    } else {
                        ConvOp::F32(
                            ConvLayer::<f32>::new(&handles, geometry, *relu, z.is_some(), math)
                                .map_err(conv_err)?,
                        )
                    };
                    workspace = workspace.max(op.workspace_bytes());
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
                            PoolLayer::max(&handles, plan.shapes[*x], *kernel, *stride, *pad)
                                .map_err(run_err)?,
                        )
                    } else {
                        PoolOp::F32(
                            PoolLayer::max(&handles, plan.shapes[*x], *kernel, *stride, *pad)
                                .map_err(run_err)?,
                        )
                    },
                    x: *x,
                    y: *y,
                },
                Step::GlobalAveragePool { x, y } => Layer::Pool {
                    op: if fp16 {
                        PoolOp::F16(
                            PoolLayer::global_average(&handles, plan.shapes[*x])
                                .map_err(run_err)?,
                        )
                    } else {
                        PoolOp::F32(
                            PoolLayer::global_average(&handles, plan.shapes[*x])
                                .map_err(run_err)?,
                        )
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
                    let to_f32 = match &half {
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
            layers.push(layer);
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
            Some(kernels) if with_images => {
                Some(GpuImages::new(kernels.clone(), handles.stream())?)
            }
            _ => None,
        };
        let mut session = CudnnSession {
            handles,
            layers,
            buffers,
            staging,
            host_input,
            images,
            batched: None,
            batch_logits: Vec::new(),
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
            session.graph = session.capture();
        }
        Ok(session)
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
        matches!(&self.layers[i], Layer::Conv { op, .. }
            if op.algorithm() != ConvAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM)
    }

    /// (conv node name, cuDNN algorithm, activation, workspace bytes) per conv, for logs.
    pub fn conv_algorithms(&self) -> Vec<(String, String, &'static str, usize)> {
        self.layers
            .iter()
            .filter_map(|l| match l {
                Layer::Conv { op, name, .. } => Some((
                    name.clone(),
                    format!("{:?}", op.algorithm()),
                    if op.relu() { "relu" } else { "identity" },
                    op.workspace_bytes(),
                )),
                _ => None,
            })
            .collect()
    }

    /// Bytes of the shared conv workspace.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.len()
    }

    fn layer_err(&self, i: usize, e: GpuOpsError) -> EngineError {
        let what = match &self.layers[i] {
            Layer::Conv { name, op, .. } => format!("conv {name} ({:?})", op.algorithm()),
            Layer::Pool { .. } => "pooling".to_string(),
            Layer::Gemm { .. } => "gemm".to_string(),
            Layer::ToHalf { .. } => "input to f16 NHWC".to_string(),
        };
        EngineError::Run(format!("layer {i} {what}: {e}"))
    }

    fn take(&mut self, t: usize) -> Result<DevBuf, GpuOpsError> {
        self.buffers
            .get_mut(t)
            .and_then(Option::take)
            .ok_or_else(|| GpuOpsError::Geometry(format!("tensor {t} missing")))
    }

    /// Queues layer `i`: its output buffer is taken out of `buffers` for the launch (so the
    /// inputs can be borrowed at the same time) and put back after.
    fn run_layer(&mut self, i: usize) -> Result<(), GpuOpsError> {
        let y = match &self.layers[i] {
            Layer::Conv { y, .. }
            | Layer::Pool { y, .. }
            | Layer::Gemm { y, .. }
            | Layer::ToHalf { y, .. } => *y,
        };
        let mut out = self.take(y)?;
        let result = self.launch_into(i, &mut out);
        self.buffers[y] = Some(out);
        result
    }

    fn launch_into(&mut self, i: usize, out: &mut DevBuf) -> Result<(), GpuOpsError> {
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
        let missing = |what: &str, ix: usize| GpuOpsError::Geometry(format!("{what} {ix} missing"));
        let buf = |t: usize| {
            buffers
                .get(t)
                .and_then(Option::as_ref)
                .ok_or_else(|| missing("tensor", t))
        };
        let param = |p: usize| weights.get(p).ok_or_else(|| missing("parameter", p));
        match &mut layers[i] {
            Layer::ToHalf {
                kernels, dims, cp, ..
            } => {
                let src = staging
                    .as_ref()
                    .ok_or_else(|| missing("staging buffer", 0))?;
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
                    None => &*zeros,
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

    /// Images per `infer` call.
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
        copied.map_err(run_err)?;
        self.run_and_download(logits)
    }

    fn device_images(&mut self) -> Option<&mut dyn DeviceImages> {
        if self.images.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

impl DeviceImages for CudnnSession {
    fn decode(&mut self, jpeg: &[u8]) -> Result<(usize, usize), EngineError> {
        self.handles.bind().map_err(run_err)?;
        let images = self
            .images
            .as_mut()
            .ok_or_else(|| EngineError::Run("session made without GPU decoding".into()))?;
        images.decode(jpeg, self.handles.stream())
    }

    /// The kernel writes the f32 NCHW input where `run` would have uploaded it: the FP16
    /// staging buffer (the first layer converts it) or the FP32 input tensor.
    fn preprocess(&mut self) -> Result<(), EngineError> {
        self.handles.bind().map_err(run_err)?;
        let CudnnSession {
            handles,
            images,
            staging,
            buffers,
            ..
        } = self;
        let images = images
            .as_mut()
            .ok_or_else(|| EngineError::Run("session made without GPU decoding".into()))?;
        let mut slot = input_slot(staging, buffers, 0, 1)?;
        images.preprocess_into(handles.stream(), &mut slot)
    }

    fn run_preprocessed(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        self.check_logits(logits)?;
        self.handles.bind().map_err(run_err)?;
        self.run_and_download(logits)
    }

    fn max_batch(&self) -> usize {
        self.batched.as_ref().map_or(1, |b| b.batch)
    }

    /// Into slot `slot` of the batch context's input (on this session's stream, which
    /// decoded the image; the wait at the end orders it before the batch run).
    fn preprocess_slot(&mut self, slot: usize) -> Result<(), EngineError> {
        let CudnnSession {
            handles,
            images,
            batched,
            ..
        } = self;
        let Some(batched) = batched.as_mut() else {
            return if slot == 0 {
                self.preprocess()
            } else {
                Err(EngineError::Run(format!(
                    "slot {slot} without a batch context"
                )))
            };
        };
        handles.bind().map_err(run_err)?;
        let images = images
            .as_mut()
            .ok_or_else(|| EngineError::Run("session made without GPU decoding".into()))?;
        let count = batched.batch;
        let mut out = input_slot(&mut batched.staging, &mut batched.buffers, slot, count)?;
        images.preprocess_into(handles.stream(), &mut out)
    }

    /// Runs the whole batch context (slots past `n` hold stale images: their logits are
    /// computed and dropped) and hands out the first `n` images' logits.
    fn run_slots(&mut self, n: usize, logits: &mut [f32]) -> Result<(), EngineError> {
        let Some(batched) = self.batched.as_mut() else {
            return if n == 1 {
                self.run_preprocessed(logits)
            } else {
                Err(EngineError::Run(format!(
                    "a batch of {n} without a batch context"
                )))
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
        batched.run_and_download(&mut self.batch_logits)?;
        logits.copy_from_slice(&self.batch_logits[..n * classes]);
        Ok(())
    }
}

/// Image `slot` of `count` of a session's f32 NCHW input: the FP16 staging buffer, or the
/// FP32 input tensor.
fn input_slot<'a>(
    staging: &'a mut Option<cu::CudaSlice<f32>>,
    buffers: &'a mut [Option<DevBuf>],
    slot: usize,
    count: usize,
) -> Result<cu::CudaViewMut<'a, f32>, EngineError> {
    let input = match staging.as_mut() {
        Some(staging) => staging,
        None => match buffers.first_mut().and_then(Option::as_mut) {
            Some(DevBuf::F32(first)) => first,
            _ => return Err(EngineError::Run("no f32 input buffer".into())),
        },
    };
    let per_image = input.len() / count.max(1);
    if slot >= count {
        return Err(EngineError::Run(format!(
            "slot {slot} of a batch of {count}"
        )));
    }
    Ok(input.slice_mut(slot * per_image..(slot + 1) * per_image))
}

impl CudnnSession {
    fn check_logits(&self, logits: &[f32]) -> Result<(), EngineError> {
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
    fn run_and_download(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        self.run_all()?;
        let out = self
            .buffers
            .get(self.output)
            .and_then(Option::as_ref)
            .ok_or_else(|| EngineError::Run("output buffer missing".to_string()))?
            .f32s()
            .map_err(run_err)?;
        self.handles.download(out, logits).map_err(run_err)
    }

    /// Whether this session's stream has the context's highest priority.
    pub fn high_priority(&self) -> bool {
        self.high_priority
    }
}

/// Whether the engine can run here (driver, cuDNN, cuBLAS), for callers and tests to skip;
/// the error names the missing library.
pub fn available() -> Result<(), GpuOpsError> {
    gpu_ops::available()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_gen;

    /// Naive host execution of a plan: checks the planning (BN folding, fusion, z order,
    /// pooling, gemm layout) against tract without a GPU. The GPU runs the same steps.
    fn reference(plan: &Plan, input: &[f32]) -> Vec<f32> {
        let mut t: Vec<Vec<f32>> = plan
            .shapes
            .iter()
            .map(|s| vec![0.0; s.iter().product()])
            .collect();
        t[0] = input.to_vec();
        for step in &plan.steps {
            match step {
                Step::Conv {
                    x,
                    y,
                    z,
                    weight,
                    bias,
                    geometry: g,
                    relu,
                    ..
                } => {
                    let [n, c, h, w] = g.x;
                    let [_, co, oh, ow] = g.output().unwrap();
                    let ([kh, kw], [sh, sw], [ph, pw]) = (g.kernel, g.stride, g.pad);
                    let (wt, b, src) = (&plan.params[*weight], &plan.params[*bias], &t[*x]);
                    let mut out = vec![0f32; n * co * oh * ow];
                    for ni in 0..n {
                        for o in 0..co {
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    let mut acc = b[o];
                                    for ci in 0..c {
                                        for ky in 0..kh {
                                            let iy = (oy * sh + ky) as isize - ph as isize;
                                            if iy < 0 || iy >= h as isize {
                                                continue;
                                            }
                                            for kx in 0..kw {
                                                let ix = (ox * sw + kx) as isize - pw as isize;
                                                if ix < 0 || ix >= w as isize {
                                                    continue;
                                                }
                                                acc += wt[((o * c + ci) * kh + ky) * kw + kx]
                                                    * src[((ni * c + ci) * h + iy as usize) * w
                                                        + ix as usize];
                                            }
                                        }
                                    }
                                    let at = ((ni * co + o) * oh + oy) * ow + ox;
                                    if let Some(z) = z {
                                        acc += t[*z][at];
                                    }
                                    out[at] = if *relu { acc.max(0.0) } else { acc };
                                }
                            }
                        }
                    }
                    t[*y] = out;
                }
                Step::MaxPool {
                    x,
                    y,
                    kernel,
                    stride,
                    pad,
                } => {
                    let [n, c, h, w] = plan.shapes[*x];
                    let [_, _, oh, ow] = plan.shapes[*y];
                    let mut out = vec![f32::MIN; n * c * oh * ow];
                    for p in 0..n * c {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let m = &mut out[(p * oh + oy) * ow + ox];
                                for ky in 0..kernel[0] {
                                    for kx in 0..kernel[1] {
                                        let iy = (oy * stride[0] + ky) as isize - pad[0] as isize;
                                        let ix = (ox * stride[1] + kx) as isize - pad[1] as isize;
                                        if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize
                                        {
                                            *m = m.max(
                                                t[*x][(p * h + iy as usize) * w + ix as usize],
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    }
                    t[*y] = out;
                }
                Step::GlobalAveragePool { x, y } => {
                    let [_, _, h, w] = plan.shapes[*x];
                    t[*y] = t[*x]
                        .chunks(h * w)
                        .map(|p| p.iter().sum::<f32>() / (h * w) as f32)
                        .collect();
                }
                Step::Gemm {
                    x,
                    y,
                    weight,
                    bias,
                    k,
                    n,
                } => {
                    let (wt, b) = (&plan.params[*weight], &plan.params[*bias]);
                    t[*y] = t[*x]
                        .chunks(*k)
                        .flat_map(|row| {
                            (0..*n).map(move |j| {
                                b[j] + row
                                    .iter()
                                    .zip(&wt[j * k..(j + 1) * k])
                                    .map(|(a, w)| a * w)
                                    .sum::<f32>()
                            })
                        })
                        .collect();
                }
            }
        }
        t[plan.output].clone()
    }

    #[test]
    fn plan_executed_on_the_host_matches_tract() {
        use crate::engine::tract_cpu::TractLoader;
        let dir = std::env::temp_dir().join(format!("hacserve-cudnn-ref-{}", std::process::id()));
        let path = dir.join("tiny.onnx");
        let model = model_gen::tiny_resnet(50);
        model_gen::write_model(&model, &path).unwrap();
        let plan = Plan::from_proto(&model, &path, 1).unwrap();
        let mut cpu = TractLoader::load(&path, 1).unwrap().session().unwrap();
        for seed in [1, 2] {
            let input = model_gen::synthetic_input(seed);
            let got = reference(&plan, &input);
            let mut want = vec![0f32; 1000];
            cpu.infer(&input, &mut want).unwrap();
            let range = want.iter().copied().fold(f32::MIN, f32::max)
                - want.iter().copied().fold(f32::MAX, f32::min);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff / range < 1e-4,
                "seed {seed}: diff {diff} of range {range}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tiny_resnet_plans_with_everything_fused() {
        let plan = Plan::from_proto(&model_gen::tiny_resnet(1), Path::new("tiny.onnx"), 1).unwrap();
        assert_eq!(plan.input_shape(), [1, 3, 224, 224]);
        assert_eq!(plan.num_classes(), 1000);
        let convs: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Conv { name, relu, z, .. } => Some((name.as_str(), *relu, z.is_some())),
                _ => None,
            })
            .collect();
        // stem, 2 convs per block, 1 downsample: BN folded, ReLU and Add fused.
        assert_eq!(convs.len(), 6);
        assert_eq!(convs[0], ("conv1", true, false));
        assert_eq!(convs[1], ("layer1.0.conv1", true, false));
        assert_eq!(convs[2], ("layer1.0.conv2", true, true));
        // layer2.0: the Add fuses into the later conv (the downsample), z = conv2's output.
        assert_eq!(convs[4], ("layer2.0.conv2", false, false));
        assert_eq!(convs[5], ("layer2.0.downsample.0", true, true));
        assert_eq!(plan.steps.len(), 6 + 3); // + maxpool, avgpool, gemm
        assert_eq!(plan.shapes[plan.output], [1, 1000, 1, 1]);
    }

    #[test]
    fn resnet50_plans_at_batch_4() {
        let plan = Plan::from_proto(&model_gen::resnet50(1), Path::new("r50.onnx"), 4).unwrap();
        let convs = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Conv { .. }))
            .count();
        assert_eq!(convs, 53);
        assert_eq!(plan.input_shape(), [4, 3, 224, 224]);
        assert_eq!(plan.shapes[plan.output], [4, 1000, 1, 1]);
    }

    #[test]
    fn batch_norm_folding_is_exact_on_one_value() {
        // conv weight 2 and BN gamma 3, beta 1, mean 0.5, var 3 (eps 1):
        // y = 3 * (2x - 0.5) / sqrt(4) + 1 = 3x + 0.25, so w' = 3 and b' = 0.25.
        let mut proto = model_gen::tiny_resnet(1);
        let g = proto.graph.as_mut().unwrap();
        let set = |g: &mut GraphProto, name: &str, v: f32| {
            let t = g.initializer.iter_mut().find(|t| t.name == name).unwrap();
            let n = t.raw_data.len() / 4;
            t.raw_data = (0..n).flat_map(|_| v.to_le_bytes()).collect();
        };
        set(g, "conv1.weight", 2.0);
        set(g, "bn1.weight", 3.0);
        set(g, "bn1.bias", 1.0);
        set(g, "bn1.running_mean", 0.5);
        set(g, "bn1.running_var", 3.0);
        let bn = g.node.iter_mut().find(|n| n.name == "bn1").unwrap();
        bn.attribute
            .iter_mut()
            .find(|a| a.name == "epsilon")
            .unwrap()
            .f = 1.0;
        let plan = Plan::from_proto(&proto, Path::new("t.onnx"), 1).unwrap();
        let Step::Conv { weight, bias, .. } = &plan.steps[0] else {
            panic!("first step is not the stem conv")
        };
        assert!(plan.params[*weight].iter().all(|&w| w == 3.0));
        assert!(plan.params[*bias].iter().all(|&b| b == 0.25));
    }

    #[test]
    fn unsupported_op_is_named() {
        let mut proto = model_gen::tiny_resnet(1);
        let graph = proto.graph.as_mut().unwrap();
        let relu = graph.node.iter_mut().find(|n| n.op_type == "Relu").unwrap();
        relu.op_type = "FancyRelu".to_string();
        let err = Plan::from_proto(&proto, Path::new("fancy.onnx"), 1).unwrap_err();
        assert!(matches!(err, EngineError::BadModel { .. }), "{err}");
        assert!(err.to_string().contains("FancyRelu"), "{err}");
    }

    #[test]
    fn unfusable_pattern_is_bad_model() {
        // A Relu straight on the input has no conv to fuse into.
        let mut proto = model_gen::tiny_resnet(1);
        let graph = proto.graph.as_mut().unwrap();
        let relu = graph.node.iter_mut().find(|n| n.op_type == "Relu").unwrap();
        relu.input[0] = model_gen::INPUT_NAME.to_string();
        let err = Plan::from_proto(&proto, Path::new("x.onnx"), 1).unwrap_err();
        assert!(matches!(err, EngineError::BadModel { .. }), "{err}");
        assert!(err.to_string().contains("Relu"), "{err}");
    }

    #[test]
    fn missing_file_is_model_file_error() {
        let err = Plan::load(Path::new("/nonexistent/model.onnx"), 1).unwrap_err();
        assert!(matches!(err, EngineError::ModelFile { .. }));
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

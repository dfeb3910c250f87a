//! The plan: the ONNX graph as a list of launches over numbered activation tensors, with
//! the weights on the host and BatchNormalization already folded into them. GPU-free, so it
//! is tested on any machine (plan_tests.rs runs it on the host against tract).
//!
//! [`Plan::from_proto`] walks the nodes in order. Supported: Conv (group 1, dilation 1,
//! symmetric pads), BatchNormalization (after a Conv), Relu (after a Conv or a fused Add),
//! Add (one operand produced by a Conv), MaxPool, GlobalAveragePool, Flatten (axis 1), Gemm
//! (transA 0). Anything else is [`EngineError::BadModel`] naming it, checked up front by the
//! shared front end ([`crate::engine::onnx::check_ops`]).

use std::collections::HashMap;
use std::path::Path;

use hacserve_ffi::gpu::ops::ConvGeometry;
use tract_onnx::pb::{ModelProto, NodeProto, TensorProto};

use crate::engine::onnx::{
    self, attr, attr_float, attr_int, attr_ints, bad_model as bad, tensor_values,
};
use crate::engine::EngineError;

/// The ONNX ops the planner knows (default domain only).
const SUPPORTED: [&str; 8] = [
    "Conv",
    "BatchNormalization",
    "Relu",
    "Add",
    "MaxPool",
    "GlobalAveragePool",
    "Flatten",
    "Gemm",
];

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

    /// Names `node`'s output: `tensor`, written by conv step `conv` while it can still
    /// absorb what follows.
    fn define(
        &mut self,
        node: &NodeProto,
        tensor: usize,
        conv: Option<usize>,
    ) -> Result<(), EngineError> {
        let out = self.output_name(node)?;
        self.values.insert(out, Value { tensor, conv });
        Ok(())
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
        self.define(node, y, Some(self.plan.steps.len() - 1))
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
        self.define(node, v.tensor, v.conv)
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
        // After the activation nothing more can be fused into this conv.
        self.define(node, v.tensor, None)
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
        self.define(node, target, Some(step))
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
        self.define(node, y, None)
    }

    fn global_average_pool(&mut self, node: &NodeProto) -> Result<(), EngineError> {
        let x = self.input(node, 0)?;
        let xs = self.plan.shapes[x.tensor];
        let y = self.new_tensor([xs[0], xs[1], 1, 1]);
        self.plan
            .steps
            .push(Step::GlobalAveragePool { x: x.tensor, y });
        self.define(node, y, None)
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
        self.define(node, y, None)
    }
}

impl Plan {
    /// Reads and plans the ONNX file at `path` for `batch` images.
    pub fn load(path: &Path, batch: usize) -> Result<Self, EngineError> {
        Self::from_proto(&onnx::read_model(path)?, path, batch)
    }

    /// Plans an in-memory model; `path` only names it in errors. No GPU involved.
    pub fn from_proto(proto: &ModelProto, path: &Path, batch: usize) -> Result<Self, EngineError> {
        if batch == 0 {
            return Err(bad(path, "batch must be at least 1"));
        }
        let graph = onnx::graph(proto, path)?;
        // Name every unsupported op up front, like the CPU backend does.
        onnx::check_ops(graph, path, "the cuDNN engine", &|n| {
            (n.domain.is_empty() || n.domain == "ai.onnx")
                && SUPPORTED.contains(&n.op_type.as_str())
        })?;
        let (input_name, shape) = onnx::input_shape(graph, path, batch)?;
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

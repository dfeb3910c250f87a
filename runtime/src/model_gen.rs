//! Deterministic ONNX models built in Rust, so tests and benchmarks need no download and no Python.
//!
//! [`resnet50`] follows torchvision's ResNet-50 v1.5 layout and naming exactly (initializer names
//! are torchvision `state_dict` keys), with seeded random weights scaled so that activations stay
//! bounded through the 50 layers. [`tiny_resnet`] has the same interface at a fraction of the cost.
//!
//! Weights come from a self-contained splitmix64 generator and only IEEE basic arithmetic (no libm
//! calls), so the same seed gives byte-identical files on every platform.

use std::path::Path;

use prost::Message;
use thiserror::Error;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    tensor_shape_proto::Dimension, type_proto, AttributeProto, GraphProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// Re-exported so callers (bins) can hold a model without depending on tract-onnx themselves.
pub use tract_onnx::pb::ModelProto;

/// Name of the model input: float [batch, 3, 224, 224], NCHW, ImageNet-normalised.
pub const INPUT_NAME: &str = "input";
/// Name of the model output: float [batch, 1000] raw logits.
pub const OUTPUT_NAME: &str = "logits";
/// Number of classes both generated models produce.
pub const NUM_CLASSES: usize = 1000;

/// ONNX IR version 7 is the first to carry opset 13; old enough for every onnxruntime release
/// that knows opset 13.
const IR_VERSION: i64 = 7;
const OPSET: i64 = 13;
const BN_EPSILON: f32 = 1e-5;

/// Errors of writing a generated model.
#[derive(Debug, Error)]
pub enum ModelGenError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write model file {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// splitmix64: tiny, well mixed, and fully specified, so seeds reproduce across platforms.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1) from the top 53 bits (exactly representable, no rounding surprises).
    fn symmetric(&mut self) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        2.0 * unit - 1.0
    }

    /// Uniform with mean 0 and standard deviation `std` (U(-a, a) has std a/sqrt(3)). A uniform
    /// rather than a normal keeps the generator free of ln/cos, whose last bit varies by libm.
    fn uniform_std(&mut self, std: f64) -> f32 {
        (self.symmetric() * std * SQRT_3) as f32
    }

    /// Uniform in [center - half_width, center + half_width).
    fn around(&mut self, center: f64, half_width: f64) -> f32 {
        (center + self.symmetric() * half_width) as f32
    }
}

const SQRT_3: f64 = 1.732_050_807_568_877_2;

/// Subtracts each row's mean (rows of `row_len` values), in f64 for a reproducible result.
fn zero_sum_rows(values: &mut [f32], row_len: usize) {
    for row in values.chunks_mut(row_len) {
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / row_len as f64;
        for v in row.iter_mut() {
            *v = (f64::from(*v) - mean) as f32;
        }
    }
}

/// Accumulates nodes and initializers of one graph; each helper returns its output tensor name.
struct GraphBuilder {
    rng: SplitMix64,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

fn float_tensor_info(name: &str, dims: &[Dimension]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim: dims.to_vec() }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn dim_value(v: i64) -> Dimension {
    Dimension {
        value: Some(dimension::Value::DimValue(v)),
        ..Default::default()
    }
}

fn dim_param(name: &str) -> Dimension {
    Dimension {
        value: Some(dimension::Value::DimParam(name.to_string())),
        ..Default::default()
    }
}

impl GraphBuilder {
    fn new(seed: u64) -> Self {
        GraphBuilder {
            rng: SplitMix64::new(seed),
            nodes: Vec::new(),
            initializers: Vec::new(),
        }
    }

    fn initializer(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(TensorProto {
            name: name.to_string(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            raw_data,
            ..Default::default()
        });
        name.to_string()
    }

    fn node(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<AttributeProto>,
    ) -> String {
        self.nodes.push(NodeProto {
            op_type: op_type.to_string(),
            name: name.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            attribute,
            ..Default::default()
        });
        output.to_string()
    }

    /// Bias-free conv (BN follows), He-initialised on fan-in so a ReLU network keeps the second
    /// moment of its activations from layer to layer.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: &str,
        input: &str,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> String {
        let fan_in = cin * kernel * kernel;
        let std = (2.0 / fan_in as f64).sqrt();
        let mut weights: Vec<f32> = (0..cout * fan_in)
            .map(|_| self.rng.uniform_std(std))
            .collect();
        // Past the stem, inputs are post-ReLU and so positive: a filter with a non-zero sum turns
        // their mean into a fixed per-channel offset that, 50 layers on, swamps the image content
        // (every input gets the same top-1). Zero-sum filters respond to content only, which is
        // what BN running statistics centred on 0 assume anyway.
        if input != INPUT_NAME {
            zero_sum_rows(&mut weights, fan_in);
        }
        let (k, s, p) = (kernel as i64, stride as i64, pad as i64);
        let w = self.initializer(
            &format!("{name}.weight"),
            &[cout as i64, cin as i64, k, k],
            &weights,
        );
        self.node(
            "Conv",
            name,
            &[input, &w],
            name,
            vec![
                attr_ints("dilations", &[1, 1]),
                attr_int("group", 1),
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("pads", &[p, p, p, p]),
                attr_ints("strides", &[s, s]),
            ],
        )
    }

    /// Inference-mode BatchNormalization with plausible running statistics: near-identity, so
    /// the He scaling of the conv before it is what sets the activation scale. `gamma_scale`
    /// shrinks the last BN of a residual branch (torchvision's zero_init_residual idea, but not
    /// zero so the branch still contributes).
    fn batch_norm(&mut self, name: &str, input: &str, channels: usize, gamma_scale: f64) -> String {
        let gamma: Vec<f32> = (0..channels)
            .map(|_| self.rng.around(gamma_scale, 0.1 * gamma_scale))
            .collect();
        let beta: Vec<f32> = (0..channels).map(|_| self.rng.around(0.0, 0.05)).collect();
        let mean: Vec<f32> = (0..channels).map(|_| self.rng.around(0.0, 0.05)).collect();
        let var: Vec<f32> = (0..channels).map(|_| self.rng.around(1.0, 0.2)).collect();
        let c = [channels as i64];
        let scale = self.initializer(&format!("{name}.weight"), &c, &gamma);
        let bias = self.initializer(&format!("{name}.bias"), &c, &beta);
        let mean = self.initializer(&format!("{name}.running_mean"), &c, &mean);
        let var = self.initializer(&format!("{name}.running_var"), &c, &var);
        self.node(
            "BatchNormalization",
            name,
            &[input, &scale, &bias, &mean, &var],
            name,
            vec![
                attr_float("epsilon", BN_EPSILON),
                attr_float("momentum", 0.9),
            ],
        )
    }

    fn relu(&mut self, name: &str, input: &str) -> String {
        self.node("Relu", name, &[input], name, vec![])
    }

    fn add(&mut self, name: &str, a: &str, b: &str) -> String {
        self.node("Add", name, &[a, b], name, vec![])
    }

    fn max_pool(&mut self, name: &str, input: &str) -> String {
        self.node(
            "MaxPool",
            name,
            &[input],
            name,
            vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("pads", &[1, 1, 1, 1]),
                attr_ints("strides", &[2, 2]),
            ],
        )
    }

    /// Stem shared by both models: conv + BN + ReLU + maxpool 3x3/2.
    fn stem(&mut self, cout: usize, kernel: usize) -> String {
        let x = self.conv("conv1", INPUT_NAME, 3, cout, kernel, 2, kernel / 2);
        let x = self.batch_norm("bn1", &x, cout, 1.0);
        let x = self.relu("relu", &x);
        self.max_pool("maxpool", &x)
    }

    /// GlobalAveragePool + Flatten + Gemm -> `logits`. The fc weights are far larger than
    /// torchvision's default because random-weight features are small: this spreads the logits
    /// to a std of 3-4 on image-like inputs, so softmax top-5 is clearly non-uniform.
    fn head(&mut self, input: &str, features: usize) -> String {
        let x = self.node("GlobalAveragePool", "avgpool", &[input], "avgpool", vec![]);
        let x = self.node(
            "Flatten",
            "flatten",
            &[&x],
            "flatten",
            vec![attr_int("axis", 1)],
        );
        let std = 32.0 / (features as f64).sqrt();
        let mut weights: Vec<f32> = (0..NUM_CLASSES * features)
            .map(|_| self.rng.uniform_std(std))
            .collect();
        // Pooled post-ReLU features share a positive common part; zero-sum rows ignore it.
        zero_sum_rows(&mut weights, features);
        let bias: Vec<f32> = (0..NUM_CLASSES)
            .map(|_| self.rng.around(0.0, 0.01))
            .collect();
        let w = self.initializer(
            "fc.weight",
            &[NUM_CLASSES as i64, features as i64],
            &weights,
        );
        let b = self.initializer("fc.bias", &[NUM_CLASSES as i64], &bias);
        self.node(
            "Gemm",
            "fc",
            &[&x, &w, &b],
            OUTPUT_NAME,
            vec![
                attr_float("alpha", 1.0),
                attr_float("beta", 1.0),
                attr_int("transB", 1),
            ],
        )
    }

    /// torchvision Bottleneck (v1.5: the stride sits on the 3x3 conv).
    fn bottleneck(
        &mut self,
        prefix: &str,
        input: &str,
        cin: usize,
        width: usize,
        stride: usize,
    ) -> String {
        let cout = width * 4;
        let x = self.conv(&format!("{prefix}.conv1"), input, cin, width, 1, 1, 0);
        let x = self.batch_norm(&format!("{prefix}.bn1"), &x, width, 1.0);
        let x = self.relu(&format!("{prefix}.relu1"), &x);
        let x = self.conv(&format!("{prefix}.conv2"), &x, width, width, 3, stride, 1);
        let x = self.batch_norm(&format!("{prefix}.bn2"), &x, width, 1.0);
        let x = self.relu(&format!("{prefix}.relu2"), &x);
        let x = self.conv(&format!("{prefix}.conv3"), &x, width, cout, 1, 1, 0);
        let x = self.batch_norm(&format!("{prefix}.bn3"), &x, cout, RESIDUAL_GAMMA);
        let identity = self.shortcut(prefix, input, cin, cout, stride);
        let x = self.add(&format!("{prefix}.add"), &x, &identity);
        self.relu(&format!("{prefix}.relu3"), &x)
    }

    /// torchvision BasicBlock (two 3x3 convs), used by the tiny model.
    fn basic_block(
        &mut self,
        prefix: &str,
        input: &str,
        cin: usize,
        cout: usize,
        stride: usize,
    ) -> String {
        let x = self.conv(&format!("{prefix}.conv1"), input, cin, cout, 3, stride, 1);
        let x = self.batch_norm(&format!("{prefix}.bn1"), &x, cout, 1.0);
        let x = self.relu(&format!("{prefix}.relu1"), &x);
        let x = self.conv(&format!("{prefix}.conv2"), &x, cout, cout, 3, 1, 1);
        let x = self.batch_norm(&format!("{prefix}.bn2"), &x, cout, RESIDUAL_GAMMA);
        let identity = self.shortcut(prefix, input, cin, cout, stride);
        let x = self.add(&format!("{prefix}.add"), &x, &identity);
        self.relu(&format!("{prefix}.relu2"), &x)
    }

    /// Identity, or torchvision's `downsample` (conv1x1 with the block's stride + BN) when the
    /// shape changes.
    fn shortcut(
        &mut self,
        prefix: &str,
        input: &str,
        cin: usize,
        cout: usize,
        stride: usize,
    ) -> String {
        if cin == cout && stride == 1 {
            return input.to_string();
        }
        let x = self.conv(
            &format!("{prefix}.downsample.0"),
            input,
            cin,
            cout,
            1,
            stride,
            0,
        );
        self.batch_norm(&format!("{prefix}.downsample.1"), &x, cout, 1.0)
    }

    fn into_model(self, graph_name: &str, doc: &str) -> ModelProto {
        let batch = dim_param("batch");
        let input = float_tensor_info(
            INPUT_NAME,
            &[batch.clone(), dim_value(3), dim_value(224), dim_value(224)],
        );
        let output = float_tensor_info(OUTPUT_NAME, &[batch, dim_value(NUM_CLASSES as i64)]);
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "hacserve-model-gen".to_string(),
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            doc_string: doc.to_string(),
            graph: Some(GraphProto {
                name: graph_name.to_string(),
                node: self.nodes,
                initializer: self.initializers,
                input: vec![input],
                output: vec![output],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Scale of the last BN gamma in each residual branch: small enough that the residual stream
/// grows only slowly over 16 blocks, large enough that every block still shapes the features.
const RESIDUAL_GAMMA: f64 = 0.25;

/// torchvision ResNet-50 v1.5 with seeded random weights: ~25.6M parameters, ~100 MB file.
pub fn resnet50(seed: u64) -> ModelProto {
    let mut g = GraphBuilder::new(seed);
    let mut x = g.stem(64, 7);
    let mut cin = 64;
    for (layer, (blocks, width)) in [(3, 64), (4, 128), (6, 256), (3, 512)]
        .into_iter()
        .enumerate()
    {
        for block in 0..blocks {
            // torchvision: layer1 keeps the resolution; the first block of layers 2-4 halves it.
            let stride = if block == 0 && layer > 0 { 2 } else { 1 };
            let prefix = format!("layer{}.{block}", layer + 1);
            x = g.bottleneck(&prefix, &x, cin, width, stride);
            cin = width * 4;
        }
    }
    g.head(&x, cin);
    g.into_model(
        "resnet50",
        &format!("torchvision ResNet-50 v1.5 layout, random weights (seed {seed})"),
    )
}

/// A small residual network with ResNet-50's interface ([N,3,224,224] -> [N,1000]) for fast
/// tests: stem conv3x3/2 3->16 + BN + ReLU + maxpool, two BasicBlocks (16 and 16->32 /2), head.
pub fn tiny_resnet(seed: u64) -> ModelProto {
    let mut g = GraphBuilder::new(seed);
    let x = g.stem(16, 3);
    let x = g.basic_block("layer1.0", &x, 16, 16, 1);
    let x = g.basic_block("layer2.0", &x, 16, 32, 2);
    g.head(&x, 32);
    g.into_model(
        "resnet_tiny",
        &format!("tiny residual network, random weights (seed {seed})"),
    )
}

/// A deterministic, image-like input for the generated models: [1, 3, 224, 224] f32, smooth
/// colour gradients and blobs in the range of ImageNet-normalised pixels (about -2..2.6).
/// Different seeds give clearly different pictures.
pub fn synthetic_input(seed: u64) -> Vec<f32> {
    const SIDE: usize = 224;
    let mut rng = SplitMix64::new(seed ^ 0x5EED_1A9E);
    let mut out = Vec::with_capacity(3 * SIDE * SIDE);
    for _channel in 0..3 {
        // A few random plane waves per channel: low frequencies, like natural image content.
        let waves: Vec<[f64; 4]> = (0..4)
            .map(|_| {
                [
                    rng.symmetric() * 12.0,
                    rng.symmetric() * 12.0,
                    rng.symmetric() * std::f64::consts::PI,
                    0.3 + 0.3 * rng.symmetric().abs(),
                ]
            })
            .collect();
        let offset = rng.symmetric() * 0.5;
        for y in 0..SIDE {
            for x in 0..SIDE {
                let (xf, yf) = (x as f64 / SIDE as f64, y as f64 / SIDE as f64);
                let v = waves
                    .iter()
                    .map(|[fx, fy, phase, amp]| amp * (fx * xf + fy * yf + phase).sin())
                    .sum::<f64>()
                    + offset;
                out.push(v.clamp(-2.0, 2.6) as f32);
            }
        }
    }
    out
}

/// The protobuf binary encoding of `model`, exactly what [`write_model`] writes.
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Serialises `model` to `path` (protobuf binary), creating the parent directory if needed.
pub fn write_model(model: &ModelProto, path: &Path) -> Result<(), ModelGenError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ModelGenError::CreateDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    std::fs::write(path, encode(model)).map_err(|source| ModelGenError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    fn run_tract(model: &ModelProto, input: &[f32]) -> Vec<f32> {
        let model = tract_onnx::onnx()
            .model_for_proto_model(model)
            .unwrap()
            .with_input_fact(0, f32::fact([1, 3, 224, 224]).into())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let tensor = Tensor::from_shape(&[1, 3, 224, 224], input).unwrap();
        let out = model.run(tvec!(tensor.into_tvalue())).unwrap();
        out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    fn argmax(v: &[f32]) -> usize {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap()
    }

    #[test]
    fn same_seed_same_bytes_different_seed_different_bytes() {
        let a = tiny_resnet(7).encode_to_vec();
        let b = tiny_resnet(7).encode_to_vec();
        let c = tiny_resnet(8).encode_to_vec();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn resnet50_layout_matches_torchvision() {
        let model = resnet50(1);
        let graph = model.graph.as_ref().unwrap();
        let params: usize = graph
            .initializer
            .iter()
            .filter(|t| !t.name.contains("running_"))
            .map(|t| t.dims.iter().product::<i64>() as usize)
            .sum();
        // torchvision resnet50: 25,557,032 trainable parameters.
        assert_eq!(params, 25_557_032);
        let convs = graph.node.iter().filter(|n| n.op_type == "Conv").count();
        let bns = graph
            .node
            .iter()
            .filter(|n| n.op_type == "BatchNormalization")
            .count();
        assert_eq!(convs, 53); // stem + 16 blocks x 3 + 4 downsample
        assert_eq!(bns, convs);
        let names: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        for expected in [
            "conv1.weight",
            "bn1.running_var",
            "layer1.0.downsample.0.weight",
            "layer2.0.conv2.weight",
            "layer4.2.bn3.running_mean",
            "fc.weight",
            "fc.bias",
        ] {
            assert!(names.contains(&expected), "missing {expected}");
        }
        // v1.5: the stride-2 of layer2.0 is on conv2 (3x3), not conv1.
        let strides = |name: &str| {
            graph
                .node
                .iter()
                .find(|n| n.name == name)
                .and_then(|n| n.attribute.iter().find(|a| a.name == "strides"))
                .map(|a| a.ints.clone())
                .unwrap()
        };
        assert_eq!(strides("layer2.0.conv1"), vec![1, 1]);
        assert_eq!(strides("layer2.0.conv2"), vec![2, 2]);
    }

    #[test]
    fn tiny_model_runs_in_tract_with_finite_logits() {
        let logits = run_tract(&tiny_resnet(50), &synthetic_input(1));
        assert_eq!(logits.len(), NUM_CLASSES);
        assert!(logits.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn write_model_creates_the_file() {
        let dir = std::env::temp_dir().join(format!("hacserve-model-gen-{}", std::process::id()));
        let path = dir.join("sub").join("tiny.onnx");
        let model = tiny_resnet(3);
        write_model(&model, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), model.encode_to_vec());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The real ResNet-50 (optimised dependencies: ~1 s): finite, non-uniform, input-dependent.
    #[test]
    fn resnet50_logits_are_finite_and_depend_on_the_input() {
        let model = resnet50(50);
        let a = run_tract(&model, &synthetic_input(1));
        let b = run_tract(&model, &synthetic_input(2));
        assert!(a.iter().chain(&b).all(|v| v.is_finite()));
        let mut sorted = a.clone();
        sorted.sort_by(|x, y| y.total_cmp(x));
        assert!(
            sorted[0] - sorted[4] > 0.1,
            "top-5 nearly uniform: {:?}",
            &sorted[..5]
        );
        assert_ne!(argmax(&a), argmax(&b));
    }
}

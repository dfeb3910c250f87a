//! The plan checked without a GPU: executed naively on the host against tract, and its
//! fusion, folding and refusals checked step by step. The GPU runs the same steps
//! (runtime/tests/gpu_engine.rs compares those runs with tract too).

use std::path::Path;

use tract_onnx::pb::GraphProto;

use super::plan::{Plan, Step};
use crate::engine::{EngineError, EngineLoader};
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
                                    if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                                        *m = m.max(t[*x][(p * h + iy as usize) * w + ix as usize]);
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

//! The ONNX front end both engines share: reading the model file, the graph input's shape,
//! the operator check, and the attribute/initializer helpers a planner needs. tract parses
//! the graph itself afterwards ([`super::tract_cpu`]); the cuDNN planner walks the nodes with
//! these helpers ([`super::cudnn::plan`]). Both report a model they cannot serve as
//! [`EngineError::BadModel`] with the same wording, before any device is touched.

use std::collections::BTreeSet;
use std::path::Path;

use prost::Message;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto,
};

use super::EngineError;

/// Used when the model does not say (no shape, or open dims): the ImageNet layout every
/// zoo model uses.
pub const DEFAULT_CHW: [usize; 3] = [3, 224, 224];

/// [`EngineError::BadModel`] for the model at `path`.
pub fn bad_model(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::BadModel {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Reads and decodes the ONNX protobuf at `path`.
pub fn read_model(path: &Path) -> Result<ModelProto, EngineError> {
    let bytes = std::fs::read(path).map_err(|source| EngineError::ModelFile {
        path: path.display().to_string(),
        source,
    })?;
    ModelProto::decode(bytes.as_slice())
        .map_err(|e| bad_model(path, format!("not an ONNX protobuf: {e}")))
}

/// The model's graph, or the error that it has none.
pub fn graph<'a>(proto: &'a ModelProto, path: &Path) -> Result<&'a GraphProto, EngineError> {
    proto
        .graph
        .as_ref()
        .ok_or_else(|| bad_model(path, "no graph in the model"))
}

/// Names every op of `graph` and its subgraphs that `supported` refuses, as
/// "domain.op" (sorted, once each), so the error lists them all up front instead of
/// surfacing later as an opaque planning or type-inference failure. `engine` names the
/// engine in the message ("tract", "the cuDNN engine").
pub fn check_ops(
    graph: &GraphProto,
    path: &Path,
    engine: &str,
    supported: &dyn Fn(&NodeProto) -> bool,
) -> Result<(), EngineError> {
    let mut missing = BTreeSet::new();
    collect_unsupported(graph, supported, &mut missing);
    if missing.is_empty() {
        return Ok(());
    }
    let ops: Vec<String> = missing.into_iter().collect();
    Err(bad_model(
        path,
        format!(
            "unsupported ONNX operator(s) for {engine}: {}",
            ops.join(", ")
        ),
    ))
}

fn collect_unsupported(
    graph: &GraphProto,
    supported: &dyn Fn(&NodeProto) -> bool,
    missing: &mut BTreeSet<String>,
) {
    for node in &graph.node {
        if !supported(node) {
            missing.insert(if node.domain.is_empty() {
                node.op_type.clone()
            } else {
                format!("{}.{}", node.domain, node.op_type)
            });
        }
        for attr in &node.attribute {
            for sub in attr.g.iter().chain(&attr.graphs) {
                collect_unsupported(sub, supported, missing);
            }
        }
    }
}

/// The single graph input (initializers listed as inputs do not count) and its shape
/// [batch, C, H, W]; C, H, W default to [`DEFAULT_CHW`] where the model leaves them open.
pub fn input_shape(
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
        return Err(bad_model(
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
            return Err(bad_model(
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
                    Some(dimension::Value::DimValue(v)) if v > 0 => usize::try_from(v).ok(),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let chw = match dims.len() {
        // No shape at all ("any rank"): trust the ImageNet layout.
        0 => DEFAULT_CHW,
        4 => [
            dims[1].unwrap_or(DEFAULT_CHW[0]),
            dims[2].unwrap_or(DEFAULT_CHW[1]),
            dims[3].unwrap_or(DEFAULT_CHW[2]),
        ],
        n => {
            return Err(bad_model(
                path,
                format!("input has rank {n}, want 4 (NCHW)"),
            ))
        }
    };
    Ok((input.name.clone(), [batch, chw[0], chw[1], chw[2]]))
}

/// Float values of an initializer (float_data or little-endian raw_data).
pub fn tensor_values(t: &TensorProto) -> Result<Vec<f32>, String> {
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

pub fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

pub fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

/// An INT attribute, or `default`; type 0 (unset) is accepted, as older exporters write it.
pub fn attr_int(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name)
        .filter(|a| a.r#type == AttributeType::Int as i32 || a.r#type == 0)
        .map(|a| a.i)
        .unwrap_or(default)
}

/// A FLOAT attribute, or `default` (type 0 accepted, as for [`attr_int`]).
pub fn attr_float(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name)
        .filter(|a| a.r#type == AttributeType::Float as i32 || a.r#type == 0)
        .map(|a| a.f)
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_gen;

    #[test]
    fn tiny_model_input_and_ops() {
        let proto = model_gen::tiny_resnet(1);
        let path = Path::new("tiny.onnx");
        let g = graph(&proto, path).unwrap();
        let (name, shape) = input_shape(g, path, 4).unwrap();
        assert_eq!(name, model_gen::INPUT_NAME);
        assert_eq!(shape, [4, 3, 224, 224]);
        assert!(check_ops(g, path, "x", &|_| true).is_ok());
        let e = check_ops(g, path, "the test", &|n| n.op_type != "Relu").unwrap_err();
        assert!(e.to_string().contains("for the test: Relu"), "{e}");
    }

    #[test]
    fn missing_file_is_model_file_error() {
        let e = read_model(Path::new("/nonexistent/model.onnx")).unwrap_err();
        assert!(matches!(e, EngineError::ModelFile { .. }));
    }
}

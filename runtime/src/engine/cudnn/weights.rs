//! The weights: the plan's host parameters turned into what the kernels read, uploaded once
//! per GPU and shared by every session of that GPU. FP32/TF32 upload the plan's f32 values as
//! they are; FP16 converts the conv filters to KRSC half (input channels of the stem padded
//! to a multiple of 8, as the tensor-core kernels want) and the conv biases to half, and
//! keeps the classifier's weights f32 (the GEMM runs in FP32).

use std::collections::HashMap;

use hacserve_ffi::gpu::cuda::cu;
use hacserve_ffi::gpu::ops::{f16, ConvGeometry, GpuDevice, GpuOpsError};

use super::plan::{Plan, Step};

/// Channels of the FP16 input tensor: a multiple of 8 (tensor-core kernels want it).
pub(super) fn padded_channels(c: usize) -> usize {
    c.div_ceil(8) * 8
}

/// A device buffer of either element type.
pub(super) enum DevBuf {
    F32(cu::CudaSlice<f32>),
    F16(cu::CudaSlice<f16>),
}

impl DevBuf {
    pub(super) fn f32s(&self) -> Result<&cu::CudaSlice<f32>, GpuOpsError> {
        match self {
            DevBuf::F32(b) => Ok(b),
            DevBuf::F16(_) => Err(GpuOpsError::Geometry("f16 buffer where f32 needed".into())),
        }
    }

    pub(super) fn f16s(&self) -> Result<&cu::CudaSlice<f16>, GpuOpsError> {
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

/// Uploads every parameter of `plan` to `gpu`, in the layout the precision's kernels read
/// (see the module note); index i of the result is the plan's parameter i.
pub(super) fn upload(gpu: &GpuDevice, plan: &Plan, fp16: bool) -> Result<Vec<DevBuf>, GpuOpsError> {
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
    plan.params
        .iter()
        .enumerate()
        .map(|(i, p)| match half_params.get(&i) {
            Some(h) => gpu.upload(h).map(DevBuf::F16),
            None => gpu.upload(p).map(DevBuf::F32),
        })
        .collect()
}

/// Whether `batched` (the same ONNX planned for another batch) has the parameters of
/// `plan`, so that its sessions can share `plan`'s uploaded weights.
pub(super) fn same_params(plan: &Plan, batched: &Plan) -> bool {
    batched.params.len() == plan.params.len()
        && batched
            .params
            .iter()
            .zip(&plan.params)
            .all(|(a, b)| a.len() == b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn krsc_half_moves_channels_last_and_pads() {
        // 2 filters of 3 channels, 1x2 kernel: value = 100 k + 10 c + s.
        let g = ConvGeometry {
            x: [1, 3, 4, 4],
            cout: 2,
            kernel: [1, 2],
            stride: [1, 1],
            pad: [0, 0],
        };
        let w: Vec<f32> = (0..2)
            .flat_map(|k| {
                (0..3).flat_map(move |c| (0..2).map(move |s| (100 * k + 10 * c + s) as f32))
            })
            .collect();
        let out = to_krsc_half(&w, &g, padded_channels(3));
        assert_eq!(out.len(), 2 * 2 * 8);
        // [k=1][r=0][s=1][c=2] and a padded channel.
        assert_eq!(out[((2 + 1) * 8) + 2].to_f32(), 121.0);
        assert_eq!(out[((2 + 1) * 8) + 5].to_f32(), 0.0);
    }
}

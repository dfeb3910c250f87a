//! What the GPU backend loads at run time, probed for a role's `--check`: the CUDA driver
//! (version, GPUs), cuDNN, cuBLAS, NVRTC and nvJPEG (each one's version, or that it is
//! missing). cudarc panics when a library is missing, so each probe starts with its
//! `is_culib_present` and never calls into a library that did not open.

use std::ffi::c_int;

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::result as cu_result;
use cudarc::nvrtc::sys as nvrtc_sys;

use super::cuda::{self, cu};
use super::sys::nvjpeg::NvJpeg;

/// One GPU the driver lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDevice {
    pub ordinal: usize,
    pub name: String,
}

/// The driver's answer: its CUDA version (e.g. 13000 = 13.0) and GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverInfo {
    pub cuda_version: i32,
    pub gpus: Vec<GpuDevice>,
}

/// A library's version as (major, minor, patch).
pub type Version = (i32, i32, i32);

/// Everything the GPU backend loads, each with what was found or why not (a sentence).
#[derive(Debug, Clone)]
pub struct GpuProbe {
    pub driver: Result<DriverInfo, String>,
    pub cudnn: Result<Version, String>,
    pub cublas: Result<Version, String>,
    pub nvrtc: Result<Version, String>,
    /// The soname opened and its version, where the library reports it.
    pub nvjpeg: Result<(&'static str, Option<Version>), String>,
}

/// Probes every library (none of them is required to be present).
pub fn probe() -> GpuProbe {
    GpuProbe {
        driver: driver(),
        cudnn: cudnn(),
        cublas: cublas(),
        nvrtc: nvrtc(),
        nvjpeg: NvJpeg::load()
            .map(|lib| (lib.soname(), lib.version()))
            .map_err(|e| e.to_string()),
    }
}

fn driver() -> Result<DriverInfo, String> {
    if !cuda::driver_present() {
        return Err(cuda::CudaError::NoDriver.to_string());
    }
    cu_result::init().map_err(|e| format!("cuInit: {e}"))?;
    let mut cuda_version: c_int = 0;
    // SAFETY: the driver library is present (checked above) and initialised; the argument is
    // a live int it writes.
    let rc = unsafe { cu::sys::cuDriverGetVersion(&mut cuda_version) };
    if rc != cu::sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuDriverGetVersion: {:?}", rc));
    }
    let count = cu_result::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
    let mut gpus = Vec::new();
    for ordinal in 0..count.max(0) {
        let name = cu_result::device::get(ordinal)
            .and_then(cu_result::device::get_name)
            .unwrap_or_else(|e| format!("(name unreadable: {e})"));
        gpus.push(GpuDevice {
            ordinal: ordinal as usize,
            name,
        });
    }
    Ok(DriverInfo { cuda_version, gpus })
}

fn cudnn() -> Result<Version, String> {
    // SAFETY: only tries to dlopen libcudnn by name; no symbol is called.
    if !unsafe { cudarc::cudnn::sys::is_culib_present() } {
        return Err("libcudnn (cuDNN 9) not found".into());
    }
    // cuDNN 9 encodes its version as major * 10000 + minor * 100 + patch.
    let v = cudarc::cudnn::result::get_version() as i32;
    Ok((v / 10000, (v % 10000) / 100, v % 100))
}

fn cublas() -> Result<Version, String> {
    // SAFETY: only tries to dlopen libcublas by name; no symbol is called.
    if !unsafe { cublas_sys::is_culib_present() } {
        return Err("libcublas not found".into());
    }
    let mut parts = [0 as c_int; 3];
    let kinds = [
        cublas_sys::libraryPropertyType::MAJOR_VERSION,
        cublas_sys::libraryPropertyType::MINOR_VERSION,
        cublas_sys::libraryPropertyType::PATCH_LEVEL,
    ];
    for (kind, part) in kinds.into_iter().zip(parts.iter_mut()) {
        // SAFETY: libcublas is present (checked above); part is a live int it writes.
        let status = unsafe { cublas_sys::cublasGetProperty(kind, part) };
        if status != cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(format!("cublasGetProperty: {status:?}"));
        }
    }
    Ok((parts[0], parts[1], parts[2]))
}

fn nvrtc() -> Result<Version, String> {
    // SAFETY: only tries to dlopen libnvrtc by name; no symbol is called.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err("libnvrtc (NVRTC) not found".into());
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: libnvrtc is present (checked above); both are live ints it writes.
    let status = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion: {status:?}"));
    }
    Ok((major, minor, 0))
}

#[cfg(test)]
mod tests {
    /// On a machine without a GPU every entry is a sentence, not a panic; with one, the
    /// driver lists at least one GPU.
    #[test]
    fn probe_reports_instead_of_panicking() {
        let probe = super::probe();
        eprintln!("{probe:?}");
        match &probe.driver {
            Ok(info) => assert!(info.cuda_version > 0, "{info:?}"),
            Err(text) => assert!(text.contains("libcuda"), "{text}"),
        }
        if let Err(text) = &probe.cudnn {
            assert!(text.contains("cudnn"), "{text}");
        }
    }
}

//! NVML (the NVIDIA driver's management library), loaded at run time like the other GPU
//! libraries: device memory in use and utilisation, for the resources sampler. Without
//! libnvidia-ml (no NVIDIA driver) [`Nvml::load`] returns the loader's error and the sampler
//! leaves its GPU columns empty.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use crate::dl::{DlError, Library};

type NvmlReturn = c_int;
type Device = *mut c_void;
const NVML_SUCCESS: NvmlReturn = 0;

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Memory {
    total: u64,
    free: u64,
    used: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

#[derive(Clone, Copy)]
struct Api {
    init: unsafe extern "C" fn() -> NvmlReturn,
    count: unsafe extern "C" fn(*mut c_uint) -> NvmlReturn,
    handle: unsafe extern "C" fn(c_uint, *mut Device) -> NvmlReturn,
    memory: unsafe extern "C" fn(Device, *mut Memory) -> NvmlReturn,
    utilization: unsafe extern "C" fn(Device, *mut Utilization) -> NvmlReturn,
    name: unsafe extern "C" fn(Device, *mut c_char, c_uint) -> NvmlReturn,
}

/// One GPU's figures at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuSample {
    /// Device memory in use (all processes), bytes.
    pub memory_used: u64,
    pub memory_total: u64,
    /// Percent of the last sample period a kernel ran (NVML's definition).
    pub utilization_percent: u32,
}

/// NVML, initialised, with the handles of every GPU.
pub struct Nvml {
    api: Api,
    devices: Vec<usize>,
}

// SAFETY: NVML is thread-safe (documented); device handles are opaque tokens valid until
// nvmlShutdown, which is never called (the library stays loaded for the process).
unsafe impl Send for Nvml {}
// SAFETY: as above.
unsafe impl Sync for Nvml {}

/// Why NVML is not usable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NvmlError {
    #[error(transparent)]
    Load(#[from] DlError),
    #[error("{call} failed with NVML status {status}")]
    Call { call: &'static str, status: i32 },
}

fn check(call: &'static str, status: NvmlReturn) -> Result<(), NvmlError> {
    if status == NVML_SUCCESS {
        Ok(())
    } else {
        Err(NvmlError::Call { call, status })
    }
}

fn api() -> Result<Api, NvmlError> {
    static API: OnceLock<Result<Api, DlError>> = OnceLock::new();
    API.get_or_init(|| {
        let lib = Library::open(
            &["libnvidia-ml.so.1", "libnvidia-ml.so"],
            "the NVIDIA driver (libnvidia-ml)",
        )?;
        // SAFETY: each type below is the exact C prototype of the NVML function named
        // (nvml.h: nvmlInit_v2(void), nvmlDeviceGetCount_v2(unsigned*),
        // nvmlDeviceGetHandleByIndex_v2(unsigned, nvmlDevice_t*),
        // nvmlDeviceGetMemoryInfo(nvmlDevice_t, nvmlMemory_t*),
        // nvmlDeviceGetUtilizationRates(nvmlDevice_t, nvmlUtilization_t*),
        // nvmlDeviceGetName(nvmlDevice_t, char*, unsigned)); a Library is never closed, so
        // the pointers stay valid.
        unsafe {
            Ok(Api {
                init: lib.sym("nvmlInit_v2", None)?,
                count: lib.sym("nvmlDeviceGetCount_v2", None)?,
                handle: lib.sym("nvmlDeviceGetHandleByIndex_v2", None)?,
                memory: lib.sym("nvmlDeviceGetMemoryInfo", None)?,
                utilization: lib.sym("nvmlDeviceGetUtilizationRates", None)?,
                name: lib.sym("nvmlDeviceGetName", None)?,
            })
        }
    })
    .clone()
    .map_err(NvmlError::from)
}

impl Nvml {
    /// Loads and initialises NVML and opens every GPU it lists.
    pub fn load() -> Result<Nvml, NvmlError> {
        let api = api()?;
        // SAFETY: nvmlInit_v2 takes no arguments; repeated calls are reference-counted.
        check("nvmlInit_v2", unsafe { (api.init)() })?;
        let mut n: c_uint = 0;
        // SAFETY: n is a live unsigned int.
        check("nvmlDeviceGetCount_v2", unsafe { (api.count)(&mut n) })?;
        let mut devices = Vec::with_capacity(n as usize);
        for i in 0..n {
            let mut d: Device = std::ptr::null_mut();
            // SAFETY: d is a live handle slot; i < the device count.
            check("nvmlDeviceGetHandleByIndex_v2", unsafe {
                (api.handle)(i, &mut d)
            })?;
            devices.push(d as usize);
        }
        Ok(Nvml { api, devices })
    }

    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// GPU `i`'s name ("NVIDIA H100 80GB HBM3"), None when NVML cannot say.
    pub fn name(&self, i: usize) -> Option<String> {
        let d = *self.devices.get(i)? as Device;
        let mut buf = [0 as c_char; 96];
        // SAFETY: buf is writable for its length; NVML writes a NUL-terminated name.
        let status = unsafe { (self.api.name)(d, buf.as_mut_ptr(), buf.len() as c_uint) };
        if status != NVML_SUCCESS {
            return None;
        }
        // SAFETY: NVML NUL-terminated it within buf (checked by the status).
        Some(
            unsafe { CStr::from_ptr(buf.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// GPU `i`'s memory and utilisation now.
    pub fn sample(&self, i: usize) -> Result<GpuSample, NvmlError> {
        let d = *self.devices.get(i).ok_or(NvmlError::Call {
            call: "device index",
            status: -1,
        })? as Device;
        let mut m = Memory::default();
        let mut u = Utilization::default();
        // SAFETY: m and u are live structs of NVML's layout; d is a handle NVML gave.
        check("nvmlDeviceGetMemoryInfo", unsafe {
            (self.api.memory)(d, &mut m)
        })?;
        // SAFETY: as above.
        check("nvmlDeviceGetUtilizationRates", unsafe {
            (self.api.utilization)(d, &mut u)
        })?;
        Ok(GpuSample {
            memory_used: m.used,
            memory_total: m.total,
            utilization_percent: u.gpu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_loads_or_names_what_is_missing() {
        match Nvml::load() {
            Ok(nvml) => {
                for i in 0..nvml.devices() {
                    let s = nvml.sample(i).unwrap();
                    assert!(s.memory_total > 0 && s.memory_used <= s.memory_total);
                    assert!(s.utilization_percent <= 100);
                }
            }
            Err(e) => {
                if std::env::var_os("HACSERVE_GPU_REQUIRED").is_some() {
                    panic!("HACSERVE_GPU_REQUIRED is set but NVML is unusable: {e}");
                }
                eprintln!("SKIPPED: NVML unusable on this machine: {e}");
                assert!(e.to_string().contains("libnvidia-ml"), "{e}");
            }
        }
    }
}

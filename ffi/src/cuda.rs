//! The CUDA driver API through cudarc, loaded at run time. cudarc panics when libcuda is
//! missing, so every use starts with [`driver`], which checks first and returns an error.

use std::sync::Arc;

use thiserror::Error;

pub use cudarc::driver as cu;

#[derive(Debug, Error)]
pub enum CudaError {
    #[error("CUDA unavailable: libcuda.so.1 not found (no NVIDIA driver on this machine)")]
    NoDriver,
    #[error("CUDA: {0}")]
    Driver(#[from] cu::DriverError),
}

/// True when the driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by name and drops it; no symbol is called.
    unsafe { cu::sys::is_culib_present() }
}

/// A context on GPU `ordinal`, or a clear error where there is no driver or no such GPU.
pub fn driver(ordinal: usize) -> Result<Arc<cu::CudaContext>, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    Ok(cu::CudaContext::new(ordinal)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        match super::driver(0) {
            Ok(ctx) => eprintln!("CUDA present: {:?}", ctx.name()),
            Err(e) => {
                eprintln!("SKIPPED CUDA context test: {e}");
                assert!(e.to_string().contains("CUDA"));
            }
        }
    }
}

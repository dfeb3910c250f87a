//! The GPU side, cudarc-style: raw bindings in [`sys`] (nvJPEG, loaded at run time; cudarc
//! brings its own for the driver, NVRTC, cuDNN and cuBLAS), and safe layers on top that check
//! every size before an `unsafe` launch or call.
//!
//! * [`cuda`]: the driver through cudarc (checked loading, dma-buf export).
//! * [`host_register`]: host memory registered with CUDA (uploads read it in place).
//! * [`ops`]: the cuDNN/cuBLAS layer launches of the GPU engine.
//! * [`nvjpeg`]: JPEG decoders over [`sys::nvjpeg`]; [`nvjpeg_batched`]: the batched API on
//!   the hardware backend (NVJPG engines).
//! * [`preprocess`]: the NVRTC resize/crop/normalise kernel.
//! * [`resident`]: device memory requests stay in (GPUDirect rings) and the kernels that
//!   read requests and write replies there.
//! * [`transfer`]: the count of bytes moved between host and device.
//! * [`probe`]: what a role's `--check` reports (driver, GPUs, library versions).

pub mod cuda;
pub mod host_register;
pub mod nvjpeg;
pub mod nvjpeg_batched;
pub mod ops;
pub mod preprocess;
pub mod probe;
pub mod resident;
pub mod sys;
pub mod transfer;

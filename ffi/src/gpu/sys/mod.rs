//! Raw GPU bindings that cudarc does not cover, loaded at run time: nvJPEG. (The CUDA driver,
//! NVRTC, cuDNN and cuBLAS come through cudarc's own `sys` layers.)

pub mod nvjpeg;

//! Every `unsafe` binding of hacserve, and nothing else. Each `unsafe` block carries a
//! `// SAFETY:` line. Higher layers (runtime/, bins/) are safe Rust.
//!
//! Layout, cudarc-style (raw `sys` layers apart from the safe ones above them):
//! * [`rdma`]: verbs and rdma_cm ([`rdma::sys`] raw, the rest safe).
//! * [`gpu`]: CUDA through cudarc, nvJPEG ([`gpu::sys`] raw), the engine's launches.
//! * [`zmq`]: libzmq through zmq-sys; [`signal`]: SIGINT/SIGTERM; [`heap`]: the C
//!   allocator's free memory back to the system; [`usage`]: getrusage and sysconf;
//!   [`nvml`]: GPU memory and utilisation (loaded at run time).
//! * `dl`: the `dlopen` loader behind every run-time library.

mod dl;
pub mod gpu;
pub mod heap;
pub mod nvml;
pub mod rdma;
pub mod signal;
pub mod usage;
pub mod zmq;

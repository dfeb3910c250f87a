//! Every `unsafe` binding of hacserve, and nothing else. Each `unsafe` block carries a
//! `// SAFETY:` line. Higher layers (runtime/, bins/) are safe Rust.

pub mod cuda;
mod dl;
pub mod gpu_ops;
pub mod gpu_preprocess;
pub mod nvjpeg;
pub mod rdma_conn;
pub mod rdma_mem;
pub mod rdmacm;
pub mod signal;
pub mod verbs;
pub mod zmq;

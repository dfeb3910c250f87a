//! The raw rdma-core layer, loaded at run time the way NCCL's `ibvwrap` does it: `#[repr(C)]`
//! mirrors of the structs, the C constants, and the function tables resolved with `dlvsym`.
//! Nothing here is meant for code above ffi: the safe layer in [`super`] wraps it, and
//! `ffi/tests/layout.rs` checks every struct and constant against the system headers.

pub mod cm;
pub mod verbs;

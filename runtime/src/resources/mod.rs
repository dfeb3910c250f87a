//! Resource accounting: what a process costs the machine (CPU time, resident memory, GPU
//! memory and utilisation), read by the load generator and sampled by every serving role.

pub mod proc;
pub mod sampler;

pub use proc::{other_process, self_process, ProcessUsage};
pub use sampler::{Latest, ResourceSummary, Sampler, DEFAULT_PERIOD};

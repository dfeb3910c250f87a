//! The serving core shared by every server role (zmq_server, rdma_server and both
//! proxies): one receive loop over any [`crate::contract::ServerTransport`] ([`core`]), the
//! work queue ([`queue`]), the workers ([`worker`]), the accounting and request log
//! ([`account`]), the monitor line ([`monitor`]) and the threads' start and orderly stop
//! ([`threads`]); [`gpu_loopback`] serves the GPU-ring path without an RDMA device.

pub mod account;
pub mod core;
pub mod gpu_loopback;
pub mod monitor;
pub mod options;
pub mod queue;
pub mod threads;
pub mod worker;

pub use account::{ServerRecord, WorkerProbe};
pub use options::{LoopPolicy, ServerOptions, DEFAULT_MAX_QUEUED_MIB};
pub use queue::{Refusal, WorkQueue};
pub use threads::{ServeResult, ServerThreads};

//! hacserve runtime: the safe core shared by every role.
//!
//! Layers, each depending only on those above it in this list:
//! - [`protocol`], [`clock`], [`logging`]: wire format v1 (fixed little-endian header +
//!   payload), timestamps, log setup.
//! - [`contract`]: what a request, a reply sink and a transport are, the counters, the poll
//!   modes and their backoff rule.
//! - [`preprocess`], [`engine`], [`labels`], [`pipeline`]: decode, resize/crop/normalise,
//!   infer, top-5.
//! - [`server`]: the serving core (one receive loop over any transport, queue, workers,
//!   accounting, monitor, orderly stop).
//! - [`transport`]: how request/response bytes move (ZeroMQ, RDMA), each implementing the
//!   contracts.
//! - [`client`], [`balancer`], [`proxy`], [`stats`]: the closed-loop client, routing over
//!   several backends, forwarding to an RDMA backend, latency tables.
//! - [`load`], [`resources`]: the in-process load generator (sweeps by concurrency and by
//!   rate) and what a process costs (CPU, memory, GPU).
//! - [`report`]: results folders read back and drawn as figures (the `report` binary).

#![forbid(unsafe_code)]

pub mod balancer;
pub mod check;
pub mod client;
pub mod clock;
pub mod contract;
pub mod engine;
pub mod labels;
pub mod load;
pub mod logging;
pub mod metrics;
pub mod model_gen;
pub mod pipeline;
pub mod preprocess;
pub mod protocol;
pub mod proxy;
pub mod report;
pub mod resources;
pub mod results;
pub mod server;
pub mod stats;
pub mod transport;

pub use hacserve_ffi::signal;
/// The safe libzmq layer, for roles that speak plain ZeroMQ (benchmarks, tools).
pub use hacserve_ffi::zmq as libzmq;

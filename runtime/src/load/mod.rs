//! The in-process load generator behind `multi_client --concurrency-range` /
//! `--request-rate-range` (perf_analyzer's model): many pipelined connections driven by a few
//! pinned threads, closed loop (a number of requests outstanding) or open loop (a rate,
//! constant or Poisson, latency counted from each request's intended send time so a stalled
//! server cannot hide behind delayed sends), measured in windows until stable.
//!
//! [`plan`]: levels and schedules; [`link`]: the transports a connection may use (ZeroMQ,
//! RDMA); [`driver`]: the sending threads and their connections;
//! [`window`]: a window's figures and the stability rule; [`sweep`]: the controller;
//! [`progress`]: what the user sees while it runs; [`output`]: tables and CSVs.

pub mod driver;
pub mod link;
pub mod output;
pub mod plan;
pub mod progress;
pub mod sweep;
pub mod window;

use thiserror::Error;

pub use driver::Connections;
pub use link::{rdma::RdmaLink, zmq::ZmqLink, LoadLink};
pub use plan::{concurrency_levels, rate_levels, Distribution, Level};
pub use sweep::{sweep, LevelResult, SweepOptions, SweepResult, WindowRule};

/// A send this much after its intended time counts as late (reported per level).
pub const LATE_AFTER_NS: u64 = 1_000_000;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Zmq(#[from] hacserve_ffi::zmq::ZmqError),
    #[error(transparent)]
    Transport(#[from] crate::contract::transport::TransportError),
    #[error(transparent)]
    Io(std::io::Error),
}

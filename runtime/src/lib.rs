//! hacserve runtime: the safe core shared by every role.
//!
//! Layers, each depending only on those above it in this list:
//! - [`protocol`], [`clock`]: wire format v1 (fixed little-endian header + payload), timestamps.
//! - [`preprocess`], [`engine`], [`labels`], [`pipeline`]: decode, resize/crop/normalise, infer, top-5.
//! - [`transport`]: how request/response bytes move (ZeroMQ today), behind two traits.
//! - [`server`], [`client`], [`balancer`], [`stats`]: serving loop, closed-loop client,
//!   routing, latency tables.

#![forbid(unsafe_code)]

pub mod backend;
pub mod balancer;
pub mod client;
pub mod clock;
pub mod engine;
pub mod labels;
pub mod logging;
pub mod model_gen;
pub mod pipeline;
pub mod preprocess;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod stats;
pub mod transport;

pub use hacserve_ffi::signal;
/// The safe libzmq layer, for roles that speak plain ZeroMQ (benchmarks, tools).
pub use hacserve_ffi::zmq as libzmq;

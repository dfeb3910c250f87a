//! ZeroMQ transport (TCP). Messages are one frame each (header + payload); everything
//! before the last frame is the routing envelope ([`envelope`]), echoed back unchanged, so
//! REQ clients and brokers (zmq_balancer) in between work without the server knowing about
//! them. [`server`]: the ROUTER side driven by the serving core; [`client`]: a DEALER.

pub mod client;
pub mod envelope;
pub mod server;

pub use client::ZmqClient;
pub use server::{hard_message_limit, ZmqJob, ZmqReplySink, ZmqServer, DEFAULT_REPLY_HWM};

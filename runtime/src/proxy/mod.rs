//! The proxies (zmq_proxy, rdma_proxy): the serving core receives on the inbound transport
//! with the forward-all policy (every request queued untouched: the backend answers
//! everything, so the proxy is transparent), and one forwarder thread ([`forwarder`])
//! moves the queue to a backend rdma_server over a pool of pipelined RDMA connections
//! ([`pool`]), answering through the inbound transport's reply sink. Only the inbound
//! transport differs between the two roles.

pub mod forwarder;
pub mod pool;

pub use forwarder::{ForwarderReport, Placement, Proxy};
pub use pool::{format_shares, ConnShare, PoolConfig, ProxyError, ProxyRequest, RdmaPool, Reply};

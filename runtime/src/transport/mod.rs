//! How request and reply bytes move. A transport is one folder (or file) here implementing
//! the contracts of [`crate::contract`]: the server side is a
//! [`ServerTransport`](crate::contract::ServerTransport) the serving core drives, the client
//! side a [`ClientTransport`](crate::contract::ClientTransport) the closed-loop client drives.

pub mod rdma;
pub mod slow_peers;
pub mod zmq;

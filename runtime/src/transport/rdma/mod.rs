//! RDMA transport (RC queue pairs set up with rdma_cm): per-client rings of registered
//! memory, requests and replies moved with RDMA WRITE_WITH_IMM, flow control by credits.
//! [`wire`]: the byte layouts both ends share (immediates, handshake private data);
//! [`server`]: the listening side the serving core drives; [`client`]: one connection's
//! client end; [`gpu_ring`]: request rings in GPU memory (`-a 1`), filled by the NIC or by
//! a loopback stand-in. The full description with a diagram is docs/rdma.md.

pub mod admission;
pub mod client;
mod conn;
mod conn_manager;
pub mod gpu_ring;
pub mod server;
pub mod wire;

use std::net::{SocketAddr, ToSocketAddrs};

use hacserve_ffi::rdma::RdmaError;

use crate::contract::TransportError;
use crate::protocol::ReplyBuffer;

pub use client::{RdmaClient, RdmaClientConfig};
/// Process-wide counts of host memory registered with CUDA (the copy rings of `-a 0` with a GPU
/// backend).
pub use hacserve_ffi::gpu::host_register::{counts as cuda_host_registrations, HostRegisterCounts};
pub use hacserve_ffi::rdma::PdShare;
pub use server::{
    Addressing, GpuRing, RdmaJob, RdmaReplySink, RdmaServer, RdmaServerConfig, ZeroCopy,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PINNED_MIB, DEFAULT_PEER_TIMEOUT_MS,
};
pub use wire::*;

/// Loads the RDMA libraries and looks for a device, so that a role can fail fast (and name
/// RDMA as what is missing) before it sets up anything else.
pub fn check_available() -> Result<(), TransportError> {
    hacserve_ffi::rdma::Rdma::load()?;
    Ok(())
}

/// wr_id tags: receives and sends are told apart by the top bit.
const WR_SEND: u64 = 1 << 63;
/// A reply write posted from a lent backend response slot (zero-copy proxy): its completion
/// gives the slot back.
const WR_LENT: u64 = 1 << 62;

fn rdma_err(text: impl Into<String>) -> TransportError {
    TransportError::Rdma(RdmaError::Other(text.into()))
}

/// Resolves `host:port` to the first address (IPv4 preferred).
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr, TransportError> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| rdma_err(format!("cannot resolve {host}: {e}")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| rdma_err(format!("{host} has no address")))
}

/// Writes a reply straight into a staging slot (its size bounds every reply, see
/// [`wire::response_slot_size`]).
struct SlotWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl ReplyBuffer for SlotWriter<'_> {
    fn prepare(&mut self, len: usize) -> &mut [u8] {
        // Validated at the handshake and per request: a reply never exceeds the slot.
        self.len = len.min(self.buf.len());
        &mut self.buf[..self.len]
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

//! A count of the bytes our code moves between host and device memory, kept by every copy in
//! this layer that crosses the PCIe bus (uploads, downloads, GPU-ring reads), so a test can
//! say how many bytes a request cost the host: the GPUDirect path promises none of its
//! payload. Copies that stand in for a NIC's DMA (the loopback ring source) are counted
//! apart, as [`Mover::NicStandIn`]: on real hardware the NIC does them, not the server.
//!
//! Relaxed atomics: one add per copy, next to a copy that costs microseconds.

use std::sync::atomic::{AtomicU64, Ordering};

/// Who moved the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mover {
    /// The server's own code (engine uploads and downloads, header reads of a GPU ring).
    Server,
    /// Device copies standing in for the NIC's DMA (loopback ring source only).
    NicStandIn,
}

/// Bytes moved so far, per direction and mover.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfers {
    pub server_h2d: u64,
    pub server_d2h: u64,
    pub nic_h2d: u64,
    pub nic_d2h: u64,
}

impl Transfers {
    /// What moved between `earlier` and `self`.
    pub fn since(&self, earlier: &Transfers) -> Transfers {
        Transfers {
            server_h2d: self.server_h2d - earlier.server_h2d,
            server_d2h: self.server_d2h - earlier.server_d2h,
            nic_h2d: self.nic_h2d - earlier.nic_h2d,
            nic_d2h: self.nic_d2h - earlier.nic_d2h,
        }
    }

    /// The server's bytes, both directions.
    pub fn server(&self) -> u64 {
        self.server_h2d + self.server_d2h
    }
}

static SERVER_H2D: AtomicU64 = AtomicU64::new(0);
static SERVER_D2H: AtomicU64 = AtomicU64::new(0);
static NIC_H2D: AtomicU64 = AtomicU64::new(0);
static NIC_D2H: AtomicU64 = AtomicU64::new(0);

/// The counters now (process-wide).
pub fn moved() -> Transfers {
    Transfers {
        server_h2d: SERVER_H2D.load(Ordering::Relaxed),
        server_d2h: SERVER_D2H.load(Ordering::Relaxed),
        nic_h2d: NIC_H2D.load(Ordering::Relaxed),
        nic_d2h: NIC_D2H.load(Ordering::Relaxed),
    }
}

/// Counts `bytes` moved host -> device.
pub fn count_h2d(mover: Mover, bytes: usize) {
    match mover {
        Mover::Server => &SERVER_H2D,
        Mover::NicStandIn => &NIC_H2D,
    }
    .fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Counts `bytes` moved device -> host.
pub fn count_d2h(mover: Mover, bytes: usize) {
    match mover {
        Mover::Server => &SERVER_D2H,
        Mover::NicStandIn => &NIC_D2H,
    }
    .fetch_add(bytes as u64, Ordering::Relaxed);
}

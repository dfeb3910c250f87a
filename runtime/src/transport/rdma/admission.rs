//! rdma_server's entry limits: how many connections it holds and how much memory their rings
//! pin. The connection manager admits a connection (or refuses it with a [`Refusal`]) before
//! it registers anything; the [`Reservation`] it gets lives in the connection and gives the
//! count and the bytes back when the connection's resources are freed.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::wire::response_slot_size;
use crate::contract::Refusal;

/// The limits and what is in use (only the connection manager admits, so check-then-add
/// cannot race; releases come from whichever thread frees a connection).
#[derive(Debug)]
pub struct Admission {
    max_connections: u32,
    budget: u64,
    connections: AtomicU32,
    pinned: AtomicU64,
}

/// Memory one connection registers, in bytes: its request ring (`depth` x `slot_size`, in
/// host memory or, with GPU addressing, in GPU memory) and its reply staging ring (`depth` x
/// (`slot_size` + 96)). The private copy of each request (docs/rdma.md) is not registered and
/// not counted here.
pub fn registered_bytes(depth: u32, slot_size: u32) -> u64 {
    depth as u64 * (slot_size as u64 + response_slot_size(slot_size) as u64)
}

fn kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).min(u32::MAX as u64) as u32
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// One connection's share for log lines: KiB below a MiB (a default client's rings are
/// ~470 KiB), MiB with one decimal above.
pub fn size_text(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{} KiB", kib(bytes))
    } else {
        format!("{:.1} MiB", mib(bytes))
    }
}

impl Admission {
    pub fn new(max_connections: u32, budget_bytes: u64) -> Arc<Admission> {
        Arc::new(Admission {
            max_connections,
            budget: budget_bytes,
            connections: AtomicU32::new(0),
            pinned: AtomicU64::new(0),
        })
    }

    /// Connections whose resources are held now (set up, serving, or torn down but not yet
    /// freed).
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    /// Bytes registered by those connections.
    pub fn pinned(&self) -> u64 {
        self.pinned.load(Ordering::Acquire)
    }

    /// Admits client `client_id`'s connection of `bytes` registered memory, or says why not.
    pub fn admit(self: &Arc<Self>, client_id: u32, bytes: u64) -> Result<Reservation, Refusal> {
        if self.connections() >= self.max_connections {
            return Err(Refusal::ConnectionLimit {
                max: self.max_connections,
            });
        }
        let free = self.budget.saturating_sub(self.pinned());
        if bytes > free {
            return Err(Refusal::PinnedBudget {
                need_kib: kib(bytes),
                free_kib: (free / 1024).min(u32::MAX as u64) as u32,
                budget_kib: kib(self.budget),
            });
        }
        self.connections.fetch_add(1, Ordering::AcqRel);
        self.pinned.fetch_add(bytes, Ordering::AcqRel);
        Ok(Reservation {
            admission: self.clone(),
            client_id,
            bytes,
        })
    }

    /// "x of y connections, a of b MiB pinned": for log lines.
    pub fn usage(&self) -> String {
        format!(
            "{} of {} connections, {:.1} of {:.0} MiB pinned",
            self.connections(),
            self.max_connections,
            mib(self.pinned()),
            mib(self.budget)
        )
    }
}

/// One admitted connection's share of the limits, given back on drop (after the
/// connection's endpoint, which is declared before it, has freed its memory).
#[derive(Debug)]
pub struct Reservation {
    admission: Arc<Admission>,
    client_id: u32,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let a = &self.admission;
        a.connections.fetch_sub(1, Ordering::AcqRel);
        a.pinned.fetch_sub(self.bytes, Ordering::AcqRel);
        log::info!(
            "client {}: resources freed, {} pinned memory released (now {})",
            self.client_id,
            size_text(self.bytes),
            a.usage()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_and_bytes_are_bounded_and_given_back() {
        let a = Admission::new(2, 10 << 20);
        let one = a.admit(1, 4 << 20).unwrap();
        assert_eq!(one.bytes(), 4 << 20);
        // The budget: 6 MiB free, 7 asked.
        assert_eq!(
            a.admit(2, 7 << 20).unwrap_err(),
            Refusal::PinnedBudget {
                need_kib: 7 << 10,
                free_kib: 6 << 10,
                budget_kib: 10 << 10
            }
        );
        let two = a.admit(2, 6 << 20).unwrap();
        assert_eq!((a.connections(), a.pinned()), (2, 10 << 20));
        // The count: both places taken, even a tiny ring is refused.
        assert_eq!(
            a.admit(3, 1).unwrap_err(),
            Refusal::ConnectionLimit { max: 2 }
        );
        drop(one);
        assert_eq!((a.connections(), a.pinned()), (1, 6 << 20));
        let three = a.admit(3, 4 << 20).unwrap();
        drop((two, three));
        assert_eq!((a.connections(), a.pinned()), (0, 0));
    }

    #[test]
    fn registered_bytes_counts_both_rings() {
        // 64 x 2 MiB: the request ring and the staging ring (96 bytes more per slot).
        assert_eq!(registered_bytes(64, 2 << 20), 64 * ((4 << 20) + 96));
        assert_eq!(registered_bytes(4, 65536), 4 * (2 * 65536 + 96));
        assert_eq!(size_text(registered_bytes(4, 4096)), "33 KiB");
        assert_eq!(size_text(registered_bytes(64, 2 << 20)), "256.0 MiB");
    }
}

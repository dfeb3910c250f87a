//! Why a server refused a connection, typed, so that a client can act on it and print it
//! (the RDMA handshake carries it in the reject's private data: `transport::rdma::wire`).

use thiserror::Error;

/// A server's reason for refusing a connection. Sizes are in KiB so that every figure fits
/// the handshake's u32 fields (up to 4 TiB).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// The connect request could not be read (magic, version, ring geometry).
    #[error("bad handshake: {0}")]
    BadHandshake(String),
    /// The ring asked for is beyond the server's `--ring-depth` / `--slot-size`.
    #[error(
        "ring of {depth} x {slot_size} B exceeds the server's limits ({max_depth} x {max_slot} B, its --ring-depth / --slot-size)"
    )]
    RingTooLarge {
        depth: u32,
        slot_size: u32,
        max_depth: u32,
        max_slot: u32,
    },
    /// The server already holds `max` connections (its `--max-connections`).
    #[error("the server is at its connection limit ({max} connections, its --max-connections)")]
    ConnectionLimit { max: u32 },
    /// The connection's rings would take the server's pinned memory beyond its budget.
    #[error(
        "the ring needs {need_kib} KiB of pinned memory, {free_kib} KiB of the server's {budget_kib} KiB are free (its --max-pinned-mib)"
    )]
    PinnedBudget {
        need_kib: u32,
        free_kib: u32,
        budget_kib: u32,
    },
    /// Setting the connection up failed on the server (registration, QP creation, ...).
    #[error("the server could not set the connection up: {0}")]
    SetupFailed(String),
    /// A reason this build does not know (an older server's text-only reject, or a newer
    /// server's code): its text.
    #[error("{0}")]
    Other(String),
}

//! How many times this process has copied a message's payload with the CPU (a request into
//! a send slot or a private copy ring, a reply into a staging slot): the proxies print it
//! per forwarded request, which is how zero-copy forwarding is checked (docs/rdma.md,
//! "Zero-copy rdma_proxy"). A header copied alone (32 bytes, to validate or route on bytes
//! the peer can no longer change) is not a payload copy and is not counted.

use std::sync::atomic::{AtomicU64, Ordering};

static PAYLOAD_COPIES: AtomicU64 = AtomicU64::new(0);

/// Counts one payload copy (called next to the memcpy).
pub fn count_payload_copy() {
    PAYLOAD_COPIES.fetch_add(1, Ordering::Relaxed);
}

/// Payload copies made so far by this process.
pub fn payload_copies() -> u64 {
    PAYLOAD_COPIES.load(Ordering::Relaxed)
}

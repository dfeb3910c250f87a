//! Live counters of a server, shared by its receive loop, workers and monitor.

use std::sync::atomic::{AtomicU64, AtomicUsize};

/// Counters shared by the transport loop, workers and the monitor (relaxed atomics only).
/// Every received request ends in exactly one of answered, rejected or overloaded; a reply
/// that could not be delivered is also counted as undeliverable (client gone) or dropped
/// (client not reading).
#[derive(Default, Debug)]
pub struct Counters {
    pub received: AtomicU64,
    pub answered: AtomicU64,
    pub rejected: AtomicU64,
    pub overloaded: AtomicU64,
    pub transport_errors: AtomicU64,
    /// Replies dropped because their client was not reading them (its queue was full).
    pub dropped_replies: AtomicU64,
    pub in_queue: AtomicUsize,
    /// Bytes the queued requests hold (their messages), bounded by `--max-queued-mib`.
    pub queued_bytes: AtomicUsize,
    /// Requests answered `Overloaded` because the queued bytes would have passed the budget
    /// (also counted in `overloaded`).
    pub over_budget: AtomicU64,
}

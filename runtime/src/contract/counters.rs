//! Live counters of a server, shared by its receive loop, workers and monitor.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

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
    /// Answered requests by task number (for `--metrics-port`).
    pub answered_by_task: [AtomicU64; 8],
    /// Rejected requests by error code (codes above 31 counted at 31).
    pub rejected_by_code: [AtomicU64; 32],
    /// Set when a metrics endpoint reads the latency histogram: finished requests then read
    /// the clock even when nothing else does.
    pub timed: AtomicBool,
    /// Receive-to-reply histogram (`metrics::LATENCY_BUCKETS_US`, then +Inf) and its sum.
    pub latency_buckets: [AtomicU64; 15],
    pub latency_sum_ns: AtomicU64,
    /// The same per server stage ([`SERVER_STAGES`]), from a worker's reply timestamps.
    pub stage_buckets: [[AtomicU64; 15]; 4],
    pub stage_sum_ns: [AtomicU64; 4],
}

/// The server stages the metrics histogram splits (docs/protocol.md, "Response body").
pub const SERVER_STAGES: [&str; 4] = ["queue", "decode", "preprocess", "infer"];

/// Upper bounds (µs) of the receive-to-reply histogram buckets (`+Inf` follows).
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    10_000_000,
];

/// The index of the bucket a latency of `ns` falls in (the last is +Inf).
pub fn latency_bucket(ns: u64) -> usize {
    LATENCY_BUCKETS_US
        .iter()
        .position(|&b| ns <= b * 1000)
        .unwrap_or(LATENCY_BUCKETS_US.len())
}

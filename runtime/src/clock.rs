//! Timestamps. Cross-process stage timestamps use CLOCK_REALTIME (nanoseconds since the Unix
//! epoch) so client and server stamps can be subtracted; on two hosts that needs PTP-synced
//! clocks. Durations measured inside one process use the monotonic clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// CLOCK_REALTIME in ns (read through the vDSO: no syscall).
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

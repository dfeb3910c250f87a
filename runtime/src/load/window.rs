//! One measurement window's figures (latency and stage histograms, counts, errors by code),
//! merged over threads and windows, and perf_analyzer's stability rule over the last three.

use hdrhistogram::Histogram;

/// Stages of the load generator's breakdown, in table and CSV order. `send-lag` is the open
/// loop's delay from a request's intended send time to its actual send (0 in the closed
/// loop); the others split the server's reply timestamps as the client table does.
pub const LOAD_STAGES: [&str; 7] = [
    "send-lag",
    "client->server",
    "queue",
    "decode",
    "preprocess",
    "infer",
    "reply",
];

/// Error slots: 1..=30 the protocol's error codes, [`NO_REPLY`] requests that got no reply
/// within the timeout, [`OTHER_ERROR`] anything else (an unknown code, a malformed reply).
pub const ERROR_SLOTS: usize = 32;
pub const NO_REPLY: usize = 0;
pub const OTHER_ERROR: usize = 31;

/// The name of an error slot for tables and CSVs.
pub fn error_name(slot: usize) -> String {
    use crate::protocol::ErrorCode;
    match slot {
        NO_REPLY => "no-reply".into(),
        OTHER_ERROR => "malformed".into(),
        code => ErrorCode::from_u32(code as u32)
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| format!("code-{code}")),
    }
}

/// Largest latency a histogram holds (1 hour, ns); longer ones are counted at it.
const HIGHEST_NS: u64 = 3_600_000_000_000;

fn histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts (1 <= low, high >= 2 low, 3 digits).
    Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("constant histogram bounds")
}

/// Figures of one window (or several merged). Allocated once per thread and reused: recording
/// never allocates.
#[derive(Clone)]
pub struct WindowStats {
    /// End-to-end latency of successful requests: from the intended send time (open loop) or
    /// the send (closed loop) to the reply, ns.
    pub latency: Histogram<u64>,
    /// Per stage in [`LOAD_STAGES`] order, successful requests only, ns.
    pub stages: [Histogram<u64>; 7],
    /// Successful replies.
    pub ok: u64,
    /// Failed requests by slot (see [`ERROR_SLOTS`]).
    pub errors: [u64; ERROR_SLOTS],
    /// Sends more than [`super::LATE_AFTER_NS`] after their intended time.
    pub late_sends: u64,
    pub sent: u64,
    /// Replies that matched no request in flight (a late reply to a request already given up).
    pub stale: u64,
    /// Window length in seconds (set by the controller).
    pub secs: f64,
    /// The load generator's CPU seconds (user + system) in the window.
    pub client_cpu_s: f64,
    /// The server's CPU seconds in the window, when its pid was given.
    pub server_cpu_s: Option<f64>,
}

impl Default for WindowStats {
    fn default() -> Self {
        Self::new()
    }
}

impl WindowStats {
    pub fn new() -> WindowStats {
        WindowStats {
            latency: histogram(),
            stages: std::array::from_fn(|_| histogram()),
            ok: 0,
            errors: [0; ERROR_SLOTS],
            late_sends: 0,
            sent: 0,
            stale: 0,
            secs: 0.0,
            client_cpu_s: 0.0,
            server_cpu_s: None,
        }
    }

    /// Records one successful request: its latency and stage durations (ns).
    pub fn record_ok(&mut self, latency_ns: u64, stages: &[u64; 7]) {
        self.ok += 1;
        self.latency.saturating_record(latency_ns.max(1));
        for (h, &v) in self.stages.iter_mut().zip(stages) {
            h.saturating_record(v.max(1));
        }
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// Requests finished (answered or failed).
    pub fn finished(&self) -> u64 {
        self.ok + self.errors_total()
    }

    pub fn throughput(&self) -> f64 {
        if self.secs > 0.0 {
            self.ok as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Adds `other`'s figures to these (windows add their lengths and CPU times).
    pub fn merge(&mut self, other: &WindowStats) {
        // Same bounds on both sides: adding never needs a resize and cannot fail.
        let _ = self.latency.add(&other.latency);
        for (a, b) in self.stages.iter_mut().zip(&other.stages) {
            let _ = a.add(b);
        }
        self.ok += other.ok;
        for (a, b) in self.errors.iter_mut().zip(&other.errors) {
            *a += b;
        }
        self.late_sends += other.late_sends;
        self.sent += other.sent;
        self.stale += other.stale;
        self.secs += other.secs;
        self.client_cpu_s += other.client_cpu_s;
        self.server_cpu_s = match (self.server_cpu_s, other.server_cpu_s) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }

    /// Back to empty, keeping the histograms' memory.
    pub fn reset(&mut self) {
        self.latency.reset();
        for h in &mut self.stages {
            h.reset();
        }
        self.ok = 0;
        self.errors = [0; ERROR_SLOTS];
        self.late_sends = 0;
        self.sent = 0;
        self.stale = 0;
        self.secs = 0.0;
        self.client_cpu_s = 0.0;
        self.server_cpu_s = None;
    }

    /// Latency at quantile `q` (0..=1), ns; 0 without samples.
    pub fn latency_at(&self, q: f64) -> u64 {
        if self.latency.is_empty() {
            0
        } else {
            self.latency.value_at_quantile(q)
        }
    }

    pub fn latency_mean(&self) -> f64 {
        if self.latency.is_empty() {
            0.0
        } else {
            self.latency.mean()
        }
    }

    /// CPU seconds per 1000 finished requests of the load generator (None without requests).
    pub fn client_cpu_per_1000(&self) -> Option<f64> {
        let n = self.finished();
        (n > 0).then(|| self.client_cpu_s / n as f64 * 1000.0)
    }

    pub fn server_cpu_per_1000(&self) -> Option<f64> {
        let n = self.finished();
        self.server_cpu_s
            .filter(|_| n > 0)
            .map(|s| s / n as f64 * 1000.0)
    }
}

/// perf_analyzer's rule: the last three windows are stable when, for throughput and for mean
/// latency alike, max / min is within `percent`% (max <= min x (1 + percent/100)). A window
/// without a successful request is never stable.
pub fn stable(last: &[&WindowStats], percent: f64) -> bool {
    if last.len() < 3 {
        return false;
    }
    let within = |values: Vec<f64>| {
        let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = values.iter().cloned().fold(0.0, f64::max);
        min > 0.0 && max <= min * (1.0 + percent / 100.0)
    };
    let w = &last[last.len() - 3..];
    within(w.iter().map(|s| s.throughput()).collect())
        && within(w.iter().map(|s| s.latency_mean()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(ok: u64, secs: f64, latency: u64) -> WindowStats {
        let mut w = WindowStats::new();
        for _ in 0..ok {
            w.record_ok(latency, &[0; 7]);
        }
        w.secs = secs;
        w
    }

    #[test]
    fn stability_needs_three_close_windows() {
        let a = window(100, 1.0, 1000);
        let b = window(105, 1.0, 1040);
        let c = window(98, 1.0, 990);
        assert!(stable(&[&a, &b, &c], 10.0));
        assert!(!stable(&[&a, &b, &c], 1.0));
        assert!(!stable(&[&a, &b], 10.0));
        let slow = window(100, 1.0, 2000);
        assert!(!stable(&[&a, &b, &slow], 10.0));
        let empty = window(0, 1.0, 0);
        assert!(!stable(&[&a, &b, &empty], 1000.0));
    }

    #[test]
    fn merged_windows_add_up() {
        let mut a = window(10, 1.0, 1000);
        a.errors[11] = 2;
        a.client_cpu_s = 0.5;
        let b = window(30, 2.0, 3000);
        a.merge(&b);
        assert_eq!((a.ok, a.finished(), a.errors_total()), (40, 42, 2));
        assert!((a.throughput() - 40.0 / 3.0).abs() < 1e-9);
        assert!(a.latency_at(0.5) >= 2990 && a.latency_at(0.5) <= 3010);
        assert!((a.client_cpu_per_1000().unwrap() - 0.5 / 42.0 * 1000.0).abs() < 1e-9);
        assert_eq!(error_name(11), "Overloaded");
        a.reset();
        assert_eq!((a.ok, a.finished()), (0, 0));
    }
}

//! The monitor line: req/s, queue depth and server-side p50/p99 over each interval.

use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hacserve_ffi::signal;

use super::account::WorkerProbe;
use super::queue::WorkQueue;
use crate::stats::Summary;

/// Prints one monitor line per interval: req/s, queue depth, server-side p50/p99 (receive to
/// reply) over the interval. Returns when a stop is requested.
pub fn spawn_monitor<J: Send + 'static>(
    interval: Duration,
    queue: Arc<WorkQueue<J>>,
    probes: Vec<Arc<WorkerProbe>>,
) -> io::Result<thread::JoinHandle<()>> {
    for p in &probes {
        p.sampled.store(true, Ordering::Relaxed);
    }
    thread::Builder::new()
        .name("monitor".into())
        .spawn(move || {
            let mut samples = Vec::with_capacity(1 << 16);
            let mut last = Instant::now();
            let mut last_answered = 0u64;
            while !signal::stop_requested() {
                thread::sleep(Duration::from_millis(50));
                if last.elapsed() < interval {
                    continue;
                }
                let secs = last.elapsed().as_secs_f64();
                last = Instant::now();
                samples.clear();
                for p in &probes {
                    while let Some(v) = p.latencies.pop() {
                        samples.push(v);
                    }
                }
                let c = &queue.counters;
                let answered =
                    c.answered.load(Ordering::Relaxed) + c.rejected.load(Ordering::Relaxed);
                let s = Summary::of(&mut samples);
                println!(
                    "[monitor] {:>9.1} req/s  queue {:>4} ({:.1} MiB)  p50 {:>9.1} us  p99 {:>9.1} us  total {}  errors {}  overloaded {} (over budget {})  dropped {}",
                    (answered - last_answered) as f64 / secs,
                    queue.depth(),
                    queue.queued_bytes() as f64 / f64::from(1 << 20),
                    s.p50 as f64 / 1e3,
                    s.p99 as f64 / 1e3,
                    answered,
                    c.rejected.load(Ordering::Relaxed),
                    c.overloaded.load(Ordering::Relaxed),
                    c.over_budget.load(Ordering::Relaxed),
                    c.dropped_replies.load(Ordering::Relaxed),
                );
                let _ = io::stdout().flush();
                last_answered = answered;
            }
        })
}

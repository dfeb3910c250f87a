//! `--metrics-port`: Prometheus text over a tiny blocking HTTP responder on its own thread,
//! off the hot path (it reads relaxed atomics the roles keep anyway). `GET /metrics` (or
//! `/`) answers the role's figures; anything else 404. One connection at a time, each with
//! a 1 s read timeout, so a stuck scraper costs a second, never the serving threads.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use hacserve_ffi::signal;

use crate::contract::counters::SERVER_STAGES;
pub use crate::contract::counters::{latency_bucket, LATENCY_BUCKETS_US};
use crate::contract::Counters;
use crate::resources::Latest;

/// The endpoint's address once bound (port 0 picks a free one).
pub struct MetricsEndpoint {
    pub addr: SocketAddr,
}

/// Binds `bind:port` and answers scrapes with `render`'s text until a stop is requested.
pub fn serve_metrics(
    bind: &str,
    port: u16,
    render: impl Fn(&mut String) + Send + 'static,
) -> io::Result<MetricsEndpoint> {
    let listener = TcpListener::bind((bind, port))?;
    let addr = listener.local_addr()?;
    // Non-blocking accept with a short sleep: the thread notices a stop within 50 ms.
    listener.set_nonblocking(true)?;
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let mut body = String::with_capacity(16 << 10);
            while !signal::stop_requested() {
                match listener.accept() {
                    Ok((stream, _)) => {
                        body.clear();
                        if let Err(e) = answer(stream, &render, &mut body) {
                            log::debug!("metrics: scrape failed: {e}");
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => {
                        log::warn!("metrics: accept failed: {e}");
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(MetricsEndpoint { addr })
}

fn answer(
    mut stream: TcpStream,
    render: &impl Fn(&mut String),
    body: &mut String,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        let k = stream.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split_whitespace().next());
    let (status, content) = match path {
        Some("/metrics") | Some("/") => {
            render(body);
            ("200 OK", body.as_str())
        }
        _ => ("404 Not Found", "not found: GET /metrics\n"),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{content}",
        content.len()
    )?;
    stream.flush()
}

/// `# HELP` / `# TYPE` lines of one metric.
pub fn describe(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One sample line: `name{labels} value`.
pub fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// The process's resources from its sampler (CPU seconds, RSS, GPU when NVML loaded).
pub fn render_resources(out: &mut String, latest: &Latest) {
    let user = latest.cpu_user_us.load(Ordering::Relaxed) as f64 / 1e6;
    let system = latest.cpu_system_us.load(Ordering::Relaxed) as f64 / 1e6;
    describe(
        out,
        "hacserve_cpu_seconds_total",
        "counter",
        "CPU time of this process",
    );
    sample(out, "hacserve_cpu_seconds_total", "mode=\"user\"", user);
    sample(out, "hacserve_cpu_seconds_total", "mode=\"system\"", system);
    describe(
        out,
        "hacserve_resident_memory_bytes",
        "gauge",
        "resident set size",
    );
    sample(
        out,
        "hacserve_resident_memory_bytes",
        "",
        latest.rss_bytes.load(Ordering::Relaxed),
    );
    let gpu_mem = latest.gpu_memory_used_bytes.load(Ordering::Relaxed);
    if gpu_mem != u64::MAX {
        describe(
            out,
            "hacserve_gpu_memory_used_bytes",
            "gauge",
            "device memory in use, all GPUs",
        );
        sample(out, "hacserve_gpu_memory_used_bytes", "", gpu_mem);
        describe(
            out,
            "hacserve_gpu_utilization_percent",
            "gauge",
            "busiest GPU's utilisation",
        );
        sample(
            out,
            "hacserve_gpu_utilization_percent",
            "",
            latest.gpu_utilization_percent.load(Ordering::Relaxed),
        );
    }
}

/// A serving core's counters: requests by outcome, answers by task, rejections by code,
/// queue depth and bytes, requests in flight, the receive-to-reply histogram.
pub fn render_counters(
    out: &mut String,
    c: &Counters,
    task_name: impl Fn(u8) -> Option<&'static str>,
) {
    let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    describe(
        out,
        "hacserve_requests_total",
        "counter",
        "requests received, by outcome",
    );
    let received = r(&c.received);
    let answered = r(&c.answered);
    let rejected = r(&c.rejected);
    let overloaded = r(&c.overloaded);
    sample(
        out,
        "hacserve_requests_total",
        "outcome=\"received\"",
        received,
    );
    sample(
        out,
        "hacserve_requests_total",
        "outcome=\"answered\"",
        answered,
    );
    sample(
        out,
        "hacserve_requests_total",
        "outcome=\"rejected\"",
        rejected,
    );
    sample(
        out,
        "hacserve_requests_total",
        "outcome=\"overloaded\"",
        overloaded,
    );
    describe(
        out,
        "hacserve_answered_total",
        "counter",
        "requests answered, by task",
    );
    nonzero(out, "hacserve_answered_total", &c.answered_by_task, |t| {
        format!("task=\"{}\"", task_name(t as u8).unwrap_or("unknown"))
    });
    describe(
        out,
        "hacserve_errors_total",
        "counter",
        "error replies, by protocol error code",
    );
    nonzero(out, "hacserve_errors_total", &c.rejected_by_code, |code| {
        format!("code=\"{code}\"")
    });
    if overloaded > 0 {
        sample(
            out,
            "hacserve_errors_total",
            "code=\"11\",where=\"queue\"",
            overloaded,
        );
    }
    describe(
        out,
        "hacserve_queue_depth",
        "gauge",
        "requests waiting for a worker",
    );
    sample(
        out,
        "hacserve_queue_depth",
        "",
        c.in_queue.load(Ordering::Relaxed),
    );
    describe(
        out,
        "hacserve_queued_bytes",
        "gauge",
        "bytes the queued requests hold",
    );
    sample(
        out,
        "hacserve_queued_bytes",
        "",
        c.queued_bytes.load(Ordering::Relaxed),
    );
    describe(
        out,
        "hacserve_in_flight",
        "gauge",
        "requests received and not yet finished",
    );
    sample(
        out,
        "hacserve_in_flight",
        "",
        received.saturating_sub(answered + rejected + overloaded),
    );
    describe(
        out,
        "hacserve_dropped_replies_total",
        "counter",
        "replies dropped, client not reading",
    );
    sample(
        out,
        "hacserve_dropped_replies_total",
        "",
        r(&c.dropped_replies),
    );
    let name = "hacserve_server_latency_seconds";
    describe(
        out,
        name,
        "histogram",
        "receive to reply of finished requests",
    );
    histogram(out, name, "", &c.latency_buckets, r(&c.latency_sum_ns));
    let name = "hacserve_stage_seconds";
    describe(
        out,
        name,
        "histogram",
        "server stages of the requests a worker answered",
    );
    for (k, stage) in SERVER_STAGES.iter().enumerate() {
        let labels = format!("stage=\"{stage}\",");
        histogram(
            out,
            name,
            &labels,
            &c.stage_buckets[k],
            r(&c.stage_sum_ns[k]),
        );
    }
}

/// One sample per non-zero counter of `values`, labelled by `label(index)`.
fn nonzero(out: &mut String, name: &str, values: &[AtomicU64], label: impl Fn(usize) -> String) {
    for (i, v) in values.iter().enumerate() {
        let n = v.load(Ordering::Relaxed);
        if n > 0 {
            sample(out, name, &label(i), n);
        }
    }
}

/// One histogram's `_bucket` (cumulative, `le` in seconds), `_sum` and `_count` lines;
/// `labels` is empty or ends in a comma.
fn histogram(out: &mut String, name: &str, labels: &str, buckets: &[AtomicU64; 15], sum_ns: u64) {
    let mut cumulative = 0u64;
    for (i, b) in buckets.iter().enumerate() {
        cumulative += b.load(Ordering::Relaxed);
        let le = match LATENCY_BUCKETS_US.get(i) {
            Some(us) => format!("{}", *us as f64 / 1e6),
            None => "+Inf".into(),
        };
        sample(
            out,
            &format!("{name}_bucket"),
            &format!("{labels}le=\"{le}\""),
            cumulative,
        );
    }
    let labels = labels.trim_end_matches(',');
    sample(out, &format!("{name}_sum"), labels, sum_ns as f64 / 1e9);
    sample(out, &format!("{name}_count"), labels, cumulative);
}

/// The balancer's counts as its loop last published them.
pub fn render_balancer(out: &mut String, c: &crate::balancer::LiveCounts) {
    let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    describe(
        out,
        "hacserve_requests_total",
        "counter",
        "requests received, by outcome",
    );
    for (outcome, v) in [
        ("received", &c.received),
        ("answered", &c.answered),
        ("timeout", &c.timed_out),
        ("unavailable", &c.unavailable),
        ("overloaded", &c.overloaded),
    ] {
        sample(
            out,
            "hacserve_requests_total",
            &format!("outcome=\"{outcome}\""),
            r(v),
        );
    }
    describe(
        out,
        "hacserve_errors_total",
        "counter",
        "error replies, by protocol error code",
    );
    sample(
        out,
        "hacserve_errors_total",
        "code=\"11\"",
        r(&c.overloaded),
    );
    sample(out, "hacserve_errors_total", "code=\"13\"", r(&c.timed_out));
    sample(
        out,
        "hacserve_errors_total",
        "code=\"14\"",
        r(&c.unavailable),
    );
    describe(
        out,
        "hacserve_resent_total",
        "counter",
        "requests sent again after a lost backend",
    );
    sample(out, "hacserve_resent_total", "", r(&c.resent));
    describe(
        out,
        "hacserve_late_replies_total",
        "counter",
        "backend replies after the deadline",
    );
    sample(out, "hacserve_late_replies_total", "", r(&c.late));
    describe(
        out,
        "hacserve_in_flight",
        "gauge",
        "requests admitted and not answered yet",
    );
    sample(out, "hacserve_in_flight", "", r(&c.in_flight));
    describe(
        out,
        "hacserve_queue_depth",
        "gauge",
        "requests waiting for a backend connection",
    );
    sample(out, "hacserve_queue_depth", "", r(&c.waiting));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_latency() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(50_000), 0);
        assert_eq!(latency_bucket(50_001), 1);
        assert_eq!(latency_bucket(50_001_000), 10);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS_US.len());
    }

    #[test]
    fn counters_render_as_prometheus_text() {
        let c = Counters::default();
        c.received.store(5, Ordering::Relaxed);
        c.answered.store(3, Ordering::Relaxed);
        c.answered_by_task[3].store(3, Ordering::Relaxed);
        c.latency_buckets[2].store(3, Ordering::Relaxed);
        let mut out = String::new();
        render_counters(&mut out, &c, |t| (t == 3).then_some("echo"));
        assert!(
            out.contains("hacserve_answered_total{task=\"echo\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("hacserve_in_flight 2\n"), "{out}");
        assert!(
            out.contains("hacserve_server_latency_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("hacserve_server_latency_seconds_bucket{le=\"0.0001\"} 0\n"),
            "{out}"
        );
    }
}

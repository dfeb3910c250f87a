//! What a sweep prints and writes: a stage table per level and one summary table
//! (perftest-style fixed columns, microseconds), the perf_analyzer-like summary CSV and the
//! per-request CSV. Column sets are versioned ([`SUMMARY_SCHEMA`], [`REQUESTS_SCHEMA`],
//! docs/results.md).

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::Path;

use super::driver::RequestLog;
use super::sweep::LevelResult;
use super::window::{error_name, WindowStats, ERROR_SLOTS, LOAD_STAGES};
use crate::stats::{write_fields, CSV_HEADER};

/// Version of `load_summary.csv`'s columns.
pub const SUMMARY_SCHEMA: u32 = 1;
/// Version of `requests.csv`'s columns: the client CSV's (version 1) plus level and send lag.
pub const REQUESTS_SCHEMA: u32 = 2;

pub const SUMMARY_HEADER: &str = "schema,level_kind,level,stable,trials,window_secs,requests,errors,throughput_rps,late_sends,stale,p50_us,p90_us,p95_us,p99_us,p999_us,max_us,avg_us,send_lag_us,client_to_server_us,queue_us,decode_us,preprocess_us,infer_us,reply_us,client_cpu_s_per_1000,server_cpu_s_per_1000,errors_by_code";

/// The columns after [`CSV_HEADER`]'s in requests.csv.
pub const REQUESTS_EXTRA_COLUMNS: &str = "level,send_lag_ns";

const US: f64 = 1e3;

fn q(w: &WindowStats, p: f64) -> f64 {
    w.latency_at(p) as f64 / US
}

fn stage_mean(w: &WindowStats, k: usize) -> f64 {
    let h = &w.stages[k];
    if h.is_empty() {
        0.0
    } else {
        h.mean() / US
    }
}

/// `Overloaded:3 no-reply:1` (empty when none).
pub fn errors_by_code(w: &WindowStats, sep: &str) -> String {
    (0..ERROR_SLOTS)
        .filter(|&k| w.errors[k] > 0)
        .map(|k| format!("{}:{}", error_name(k), w.errors[k]))
        .collect::<Vec<_>>()
        .join(sep)
}

fn opt(v: Option<f64>, width: usize) -> String {
    match v {
        Some(v) => format!("{v:>width$.4}"),
        None => format!("{:>width$}", "-"),
    }
}

/// One level's stage table: count and p50/p90/p95/p99/p99.9/max/mean of end-to-end and every
/// stage, in µs.
pub fn level_table(r: &LevelResult) -> String {
    let w = &r.stats;
    let mut s = String::new();
    let rule = "-".repeat(105);
    let _ = writeln!(s, "{rule}");
    let _ = writeln!(
        s,
        " {}: {} ({} windows, {:.3} s measured): {} ok, {} errors, {:.1} req/s, {} late sends{}",
        r.level,
        if r.stable { "stable" } else { "UNSTABLE" },
        r.trials,
        w.secs,
        w.ok,
        w.errors_total(),
        w.throughput(),
        w.late_sends,
        match errors_by_code(w, " ") {
            e if e.is_empty() => String::new(),
            e => format!(" ({e})"),
        }
    );
    let _ = writeln!(s, "{rule}");
    let _ = writeln!(
        s,
        " {:<16}{:>9}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}{:>12}",
        "stage",
        "count",
        "p50[us]",
        "p90[us]",
        "p95[us]",
        "p99[us]",
        "p99.9[us]",
        "max[us]",
        "mean[us]"
    );
    let row = |s: &mut String, name: &str, h: &hdrhistogram::Histogram<u64>| {
        let at = |p: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(p) as f64 / US
            }
        };
        let _ = writeln!(
            s,
            " {:<16}{:>9}{:>11.1}{:>11.1}{:>11.1}{:>11.1}{:>11.1}{:>11.1}{:>12.1}",
            name,
            h.len(),
            at(0.5),
            at(0.9),
            at(0.95),
            at(0.99),
            at(0.999),
            if h.is_empty() {
                0.0
            } else {
                h.max() as f64 / US
            },
            if h.is_empty() { 0.0 } else { h.mean() / US },
        );
    };
    row(&mut s, "end-to-end", &w.latency);
    for (name, h) in LOAD_STAGES.iter().zip(&w.stages) {
        row(&mut s, name, h);
    }
    let _ = write!(s, "{rule}");
    s
}

/// The sweep's summary table, one row per level.
pub fn summary_table(levels: &[LevelResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        " {:<13}{:>10}{:>9}{:>7}{:>10}{:>8}{:>7}{:>12}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}{:>13}{:>13}",
        "level", "value", "stable", "trials", "requests", "errors", "late", "req/s", "p50[us]", "p90[us]", "p95[us]", "p99[us]", "p99.9[us]", "max[us]", "cli cpu-s/1k", "srv cpu-s/1k"
    );
    for r in levels {
        let w = &r.stats;
        let _ = writeln!(
            s,
            " {:<13}{:>10}{:>9}{:>7}{:>10}{:>8}{:>7}{:>12.1}{:>11.1}{:>11.1}{:>11.1}{:>11.1}{:>11.1}{:>11.1}{}{}",
            r.level.kind(),
            r.level.value(),
            if r.stable { "yes" } else { "NO" },
            r.trials,
            w.ok,
            w.errors_total(),
            w.late_sends,
            w.throughput(),
            q(w, 0.5),
            q(w, 0.9),
            q(w, 0.95),
            q(w, 0.99),
            q(w, 0.999),
            w.latency.max() as f64 / US,
            opt(w.client_cpu_per_1000(), 13),
            opt(w.server_cpu_per_1000(), 13),
        );
    }
    s
}

/// The summary CSV's row for one level.
pub fn summary_row(r: &LevelResult) -> String {
    let w = &r.stats;
    let o = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    format!(
        "{SUMMARY_SCHEMA},{},{},{},{},{:.6},{},{},{:.3},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{},{},{}",
        r.level.kind(),
        r.level.value(),
        r.stable,
        r.trials,
        w.secs,
        w.ok,
        w.errors_total(),
        w.throughput(),
        w.late_sends,
        w.stale,
        q(w, 0.5),
        q(w, 0.9),
        q(w, 0.95),
        q(w, 0.99),
        q(w, 0.999),
        w.latency.max() as f64 / US,
        w.latency_mean() / US,
        stage_mean(w, 0),
        stage_mean(w, 1),
        stage_mean(w, 2),
        stage_mean(w, 3),
        stage_mean(w, 4),
        stage_mean(w, 5),
        stage_mean(w, 6),
        o(w.client_cpu_per_1000()),
        o(w.server_cpu_per_1000()),
        errors_by_code(w, ";"),
    )
}

pub fn write_summary_csv(path: &Path, levels: &[LevelResult]) -> io::Result<()> {
    let mut w = io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(w, "{SUMMARY_HEADER}")?;
    for r in levels {
        writeln!(w, "{}", summary_row(r))?;
    }
    w.flush()
}

/// The per-request CSV (schema [`REQUESTS_SCHEMA`]); `levels[i]` names level index i.
pub fn write_requests_csv(path: &Path, logs: &[RequestLog], levels: &[f64]) -> io::Result<()> {
    let mut w = io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(w, "{CSV_HEADER},{REQUESTS_EXTRA_COLUMNS}")?;
    for log in logs {
        for (level, r, lag) in &log.rows {
            write_fields(&mut w, r)?;
            let level = levels.get(*level as usize).copied().unwrap_or(0.0);
            writeln!(w, ",{level},{lag}")?;
        }
    }
    w.flush()
}

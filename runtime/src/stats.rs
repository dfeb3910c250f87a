//! Per-request records, stage breakdowns, latency tables (perftest-style), CSV and JSON output.

use std::fmt::Write as _;
use std::io::{self, BufRead, Write};
use std::path::Path;

use crate::protocol::ServerTimestamps;

/// Stage names in table/CSV order. `client->server` and `reply` subtract a client stamp from
/// a server stamp: meaningful on one host, or across hosts with synchronised clocks.
pub const STAGES: [&str; 7] = [
    "end-to-end",
    "client->server",
    "queue",
    "decode",
    "preprocess",
    "infer",
    "reply",
];

/// Everything known about one request, filled by the client as replies arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestRecord {
    pub client_id: u32,
    pub request_id: u64,
    pub task: u8,
    /// 0 = answered, otherwise the protocol error code the server sent.
    pub status: u32,
    /// CLOCK_REALTIME ns when the request was handed to the transport.
    pub client_sent: u64,
    pub server: ServerTimestamps,
    /// CLOCK_REALTIME ns when the reply was taken from the transport.
    pub client_received: u64,
    /// Round trip on the client's monotonic clock.
    pub e2e_ns: u64,
    /// Top-1 class, or -1 when the task has no inference.
    pub top1: i64,
}

impl RequestRecord {
    /// Stage durations in ns, in [`STAGES`] order (saturating: clock steps never go negative).
    pub fn stages(&self) -> [u64; 7] {
        let s = &self.server;
        [
            self.e2e_ns,
            s.received.saturating_sub(self.client_sent),
            s.started.saturating_sub(s.received),
            s.decoded.saturating_sub(s.started),
            s.preprocessed.saturating_sub(s.decoded),
            s.inferred.saturating_sub(s.preprocessed),
            self.client_received.saturating_sub(s.replied),
        ]
    }
}

pub const CSV_HEADER: &str = "client_id,request_id,task,status,client_sent_ns,server_received_ns,server_started_ns,server_decoded_ns,server_preprocessed_ns,server_inferred_ns,server_replied_ns,client_received_ns,e2e_ns,top1";

pub fn write_csv(path: &Path, records: &[RequestRecord]) -> io::Result<()> {
    let mut w = io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(w, "{CSV_HEADER}")?;
    for r in records {
        write_fields(&mut w, r)?;
        writeln!(w)?;
    }
    w.flush()
}

/// One record's [`CSV_HEADER`] fields, comma-separated, no line end (CSVs that add columns
/// after them write their own).
pub fn write_fields(w: &mut impl Write, r: &RequestRecord) -> io::Result<()> {
    let s = &r.server;
    write!(
        w,
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        r.client_id,
        r.request_id,
        r.task,
        r.status,
        r.client_sent,
        s.received,
        s.started,
        s.decoded,
        s.preprocessed,
        s.inferred,
        s.replied,
        r.client_received,
        r.e2e_ns,
        r.top1
    )
}

/// Reads a CSV written by [`write_csv`] back into records.
pub fn read_csv(path: &Path) -> io::Result<Vec<RequestRecord>> {
    let bad = |line: usize, what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}:{line}: {what}", path.display()),
        )
    };
    let reader = io::BufReader::new(std::fs::File::open(path)?);
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if i == 0 {
            if line.trim() != CSV_HEADER {
                return Err(bad(1, "unexpected header"));
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 14 {
            return Err(bad(i + 1, "expected 14 fields"));
        }
        let n = |k: usize| f[k].parse::<u64>().map_err(|_| bad(i + 1, "bad number"));
        out.push(RequestRecord {
            client_id: n(0)? as u32,
            request_id: n(1)?,
            task: n(2)? as u8,
            status: n(3)? as u32,
            client_sent: n(4)?,
            server: ServerTimestamps {
                received: n(5)?,
                started: n(6)?,
                decoded: n(7)?,
                preprocessed: n(8)?,
                inferred: n(9)?,
                replied: n(10)?,
            },
            client_received: n(11)?,
            e2e_ns: n(12)?,
            top1: f[13].parse().map_err(|_| bad(i + 1, "bad top1"))?,
        });
    }
    Ok(out)
}

/// Order statistics of one latency series, in ns.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Summary {
    /// Nearest-rank percentiles; sorts `values` in place.
    pub fn of(values: &mut [u64]) -> Summary {
        if values.is_empty() {
            return Summary::default();
        }
        values.sort_unstable();
        let n = values.len();
        let rank = |p: f64| values[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Summary {
            count: n,
            mean: values.iter().map(|&v| v as f64).sum::<f64>() / n as f64,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            p999: rank(0.999),
            max: values[n - 1],
        }
    }
}

/// The result of a run: request count, errors, throughput and per-stage summaries.
#[derive(Debug, Clone)]
pub struct Report {
    pub label: String,
    pub requests: usize,
    pub errors: usize,
    pub wall_secs: f64,
    /// Per stage in [`STAGES`] order, over successful requests only.
    pub stages: Vec<Summary>,
}

impl Report {
    pub fn from_records(label: &str, records: &[RequestRecord], wall_secs: f64) -> Report {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.status == 0).collect();
        let mut column = Vec::with_capacity(ok.len());
        let stages = (0..STAGES.len())
            .map(|k| {
                column.clear();
                column.extend(ok.iter().map(|r| r.stages()[k]));
                Summary::of(&mut column)
            })
            .collect();
        Report {
            label: label.to_string(),
            requests: records.len(),
            errors: records.len() - ok.len(),
            wall_secs,
            stages,
        }
    }

    pub fn throughput(&self) -> f64 {
        if self.wall_secs > 0.0 {
            (self.requests - self.errors) as f64 / self.wall_secs
        } else {
            0.0
        }
    }

    /// A perftest-style table in microseconds.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let rule = "-".repeat(94);
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(
            s,
            " {}: {} requests, {} errors, {:.3} s, {:.1} req/s",
            self.label,
            self.requests,
            self.errors,
            self.wall_secs,
            self.throughput()
        );
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(
            s,
            " {:<16}{:>8}{:>11}{:>11}{:>11}{:>11}{:>11}{:>12}",
            "stage", "count", "p50[us]", "p90[us]", "p99[us]", "p99.9[us]", "max[us]", "mean[us]"
        );
        let us = |ns: u64| ns as f64 / 1e3;
        for (name, st) in STAGES.iter().zip(&self.stages) {
            let _ = writeln!(
                s,
                " {:<16}{:>8}{:>11.1}{:>11.1}{:>11.1}{:>11.1}{:>11.1}{:>12.1}",
                name,
                st.count,
                us(st.p50),
                us(st.p90),
                us(st.p99),
                us(st.p999),
                us(st.max),
                st.mean / 1e3
            );
        }
        let _ = write!(s, "{rule}");
        s
    }

    /// A JSON object with the same figures (ns), for scripts and plots.
    pub fn json(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "{{\"label\":{:?},\"requests\":{},\"errors\":{},\"wall_secs\":{:.6},\"throughput_rps\":{:.3},\"stages\":{{",
            self.label,
            self.requests,
            self.errors,
            self.wall_secs,
            self.throughput()
        );
        for (i, (name, st)) in STAGES.iter().zip(&self.stages).enumerate() {
            let _ = write!(
                s,
                "{}{:?}:{{\"count\":{},\"mean_ns\":{:.1},\"p50_ns\":{},\"p90_ns\":{},\"p99_ns\":{},\"p999_ns\":{},\"max_ns\":{}}}",
                if i > 0 { "," } else { "" },
                name,
                st.count,
                st.mean,
                st.p50,
                st.p90,
                st.p99,
                st.p999,
                st.max
            );
        }
        s.push_str("}}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<u64> = (1..=1000).rev().collect();
        let s = Summary::of(&mut v);
        assert_eq!(
            (s.p50, s.p90, s.p99, s.p999, s.max),
            (500, 900, 990, 999, 1000)
        );
        assert!((s.mean - 500.5).abs() < 1e-9);
        assert_eq!(Summary::of(&mut []).count, 0);
        let mut one = [7u64];
        assert_eq!(Summary::of(&mut one).p999, 7);
    }

    #[test]
    fn stages_and_csv_round_trip() {
        let r = RequestRecord {
            client_id: 2,
            request_id: 9,
            task: 0,
            status: 0,
            client_sent: 100,
            server: ServerTimestamps {
                received: 150,
                started: 160,
                decoded: 200,
                preprocessed: 230,
                inferred: 330,
                replied: 340,
            },
            client_received: 400,
            e2e_ns: 300,
            top1: 42,
        };
        assert_eq!(r.stages(), [300, 50, 10, 40, 30, 100, 60]);
        let dir = std::env::temp_dir().join(format!("hacserve-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.csv");
        let mut failed = r;
        failed.status = 9;
        failed.top1 = -1;
        write_csv(&path, &[r, failed]).unwrap();
        assert_eq!(read_csv(&path).unwrap(), vec![r, failed]);
        let report = Report::from_records("t", &[r, failed], 1.0);
        assert_eq!((report.requests, report.errors), (2, 1));
        assert_eq!(report.stages[5].p50, 100);
        assert!(report.table().contains("infer"));
        assert!(report.json().contains("\"p99_ns\":300"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

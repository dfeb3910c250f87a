//! What `report` drew, as `report.csv` (one row per run and level, the figures' numbers
//! and which figures show it) and the same as a table for the terminal.

use std::fmt::Write as _;
use std::path::Path;

use super::folder::{Group, Run};
use super::ReportError;

pub const REPORT_HEADER: &str = "run,folder,level,requests,errors,throughput_rps,p50_us,p99_us,client_to_server_us,queue_us,decode_us,preprocess_us,infer_us,reply_us,client_cpu_s_per_1000,server_cpu_s_per_1000,figures";

/// The figures (by file stem) a group appears in, the same rules as figures.rs's.
pub fn figures_of(g: &Group) -> Vec<&'static str> {
    let mut f = Vec::new();
    if !g.e2e_us.is_empty() {
        f.push("latency_cdf");
    }
    if g.stages_us.is_some() {
        f.push("stage_breakdown");
    }
    if g.throughput_rps.is_some() && g.p99_us.is_some() {
        f.push("throughput_p99");
    }
    if g.client_cpu_s_per_1000.is_some() || g.server_cpu_s_per_1000.is_some() {
        f.push("cpu_per_request");
    }
    f
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_default()
}

fn count(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

pub fn csv(runs: &[Run]) -> String {
    let mut s = String::from(REPORT_HEADER);
    s.push('\n');
    for run in runs {
        for g in &run.groups {
            let st = |k: usize| opt(g.stages_us.map(|s| s[k]), 1);
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                field(&run.label),
                field(&run.folder.display().to_string()),
                field(&g.name),
                count(g.requests),
                count(g.errors),
                opt(g.throughput_rps, 3),
                opt(g.p50_us, 1),
                opt(g.p99_us, 1),
                st(0),
                st(1),
                st(2),
                st(3),
                st(4),
                st(5),
                opt(g.client_cpu_s_per_1000, 6),
                opt(g.server_cpu_s_per_1000, 6),
                figures_of(g).join(";"),
            );
        }
    }
    s
}

pub fn write_csv(path: &Path, runs: &[Run]) -> Result<(), ReportError> {
    std::fs::write(path, csv(runs)).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The table printed after drawing.
pub fn table(runs: &[Run]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        " {:<44}{:<20}{:>9}{:>11}{:>11}{:>11}{:>12}{:>12}  figures",
        "run", "level", "requests", "req/s", "p50[us]", "p99[us]", "cli cpu/1k", "srv cpu/1k"
    );
    let dash = |v: String| if v.is_empty() { "-".to_string() } else { v };
    for run in runs {
        if run.groups.is_empty() {
            let _ = writeln!(s, " {:<44}(nothing to draw)", fit(&run.label, 43));
        }
        for g in &run.groups {
            let _ = writeln!(
                s,
                " {:<44}{:<20}{:>9}{:>11}{:>11}{:>11}{:>12}{:>12}  {}",
                fit(&run.label, 43),
                if g.name.is_empty() {
                    "(whole run)"
                } else {
                    &g.name
                },
                dash(count(g.requests)),
                dash(opt(g.throughput_rps, 1)),
                dash(opt(g.p50_us, 1)),
                dash(opt(g.p99_us, 1)),
                dash(opt(g.client_cpu_s_per_1000, 4)),
                dash(opt(g.server_cpu_s_per_1000, 4)),
                dash(figures_of(g).join(",")),
            );
        }
    }
    s
}

fn fit(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_with_commas_are_quoted() {
        let run = Run {
            folder: "r".into(),
            label: "zmq echo -> a:1,b:2".into(),
            meta: None,
            groups: vec![Group {
                name: "concurrency 2".into(),
                value: 2.0,
                throughput_rps: Some(10.0),
                p99_us: Some(5.0),
                ..Default::default()
            }],
        };
        let text = csv(&[run]);
        let row = text.lines().nth(1).unwrap();
        assert_eq!(
            row,
            "\"zmq echo -> a:1,b:2\",r,concurrency 2,,,10.000,,5.0,,,,,,,,,throughput_p99"
        );
    }
}

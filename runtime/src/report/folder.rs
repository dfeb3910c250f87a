//! One results folder read into a typed [`Run`]: its description from run.json and one
//! [`Group`] per load level (or one for the whole run) with what the figures need: the
//! successful requests' end-to-end latencies, the mean of each stage, throughput and
//! percentiles, CPU-seconds per 1000 requests. Every file read is checked (schema, columns,
//! values) and a bad one is a typed error naming it; a file run.json lists that is missing
//! is one too.

use std::path::{Path, PathBuf};

use super::json::Json;
use super::table::{Row, Table};
use super::ReportError;

/// The stages stacked in the breakdown figure, in order (docs/results.md).
pub const STAGES: [&str; 6] = [
    "client->server",
    "queue",
    "decode",
    "preprocess",
    "infer",
    "reply",
];

/// load_summary.csv's columns for [`STAGES`].
const SUMMARY_STAGE_COLUMNS: [&str; 6] = [
    "client_to_server_us",
    "queue_us",
    "decode_us",
    "preprocess_us",
    "infer_us",
    "reply_us",
];

/// What run.json says about the run (docs/results.md); None where it has null.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub role: String,
    pub transport: String,
    pub task: Option<String>,
    pub backend: Option<String>,
    pub precision: Option<String>,
    pub addressing: Option<String>,
    pub model: Option<String>,
    pub payload_bytes: Option<u64>,
    pub hosts: Vec<String>,
    /// The files it lists, with their schema versions.
    pub files: Vec<(String, u32)>,
    /// Requests the role finished (servers and zmq_balancer write it).
    pub finished_requests: Option<u64>,
}

impl Meta {
    /// `transport task backend addressing -> host,host` (the parts run.json has).
    pub fn label(&self) -> String {
        let mut parts = vec![self.transport.clone()];
        if self.role != "multi_client" && !self.role.ends_with("_client") {
            parts.push(self.role.clone());
        }
        for p in [&self.task, &self.backend, &self.addressing]
            .into_iter()
            .flatten()
        {
            parts.push(p.clone());
        }
        let mut label = parts.join(" ");
        if !self.hosts.is_empty() {
            label.push_str(" -> ");
            label.push_str(&self.hosts.join(","));
        }
        label
    }
}

/// One load level of a run (or the whole run when it has no levels).
#[derive(Debug, Clone, Default)]
pub struct Group {
    /// `concurrency 3`, `request_rate 200`, `clients 4`, or empty for the whole run.
    pub name: String,
    /// The level's value, for ordering and matching requests.csv's `level` column.
    pub value: f64,
    /// Successful requests' end-to-end latencies in µs, sorted.
    pub e2e_us: Vec<f64>,
    /// Mean per stage in µs ([`STAGES`] order).
    pub stages_us: Option<[f64; 6]>,
    pub requests: Option<u64>,
    pub errors: Option<u64>,
    pub throughput_rps: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub stable: Option<bool>,
    pub client_cpu_s_per_1000: Option<f64>,
    pub server_cpu_s_per_1000: Option<f64>,
}

impl Group {
    fn named(name: String, value: f64) -> Group {
        Group {
            name,
            value,
            ..Default::default()
        }
    }

    /// A short tag for axis labels: `c=3`, `200/s`, `4 clients`, empty for the whole run.
    pub fn tag(&self) -> String {
        let v = self.value;
        match self.name.split_whitespace().next() {
            Some("concurrency") => format!("c={v}"),
            Some("request_rate") => format!("{v}/s"),
            Some("clients") => format!("{v} clients"),
            _ => self.name.clone(),
        }
    }
}

/// One results folder.
#[derive(Debug, Clone)]
pub struct Run {
    pub folder: PathBuf,
    pub label: String,
    pub meta: Option<Meta>,
    pub groups: Vec<Group>,
}

impl Run {
    /// `label` alone for a run of one group, else `label tag`.
    pub fn group_label(&self, g: &Group) -> String {
        if self.groups.len() > 1 && !g.name.is_empty() {
            format!("{} {}", self.label, g.tag())
        } else {
            self.label.clone()
        }
    }
}

fn read_text(path: &Path) -> Result<String, ReportError> {
    std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn opt_string(
    j: &Json,
    path: &Path,
    field: &'static str,
    required: bool,
) -> Result<Option<String>, ReportError> {
    match j.get(field) {
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Null) | None if !required => Ok(None),
        _ => Err(ReportError::Field {
            path: path.to_path_buf(),
            field,
            expected: if required {
                "a string"
            } else {
                "a string or null"
            },
        }),
    }
}

/// run.json (schema 1) into a [`Meta`].
pub fn read_run_json(path: &Path) -> Result<Meta, ReportError> {
    let text = read_text(path)?;
    let j = Json::parse(&text).map_err(|e| ReportError::Json {
        path: path.to_path_buf(),
        at: e.at,
        what: e.what,
    })?;
    let field = |field: &'static str, expected: &'static str| ReportError::Field {
        path: path.to_path_buf(),
        field,
        expected,
    };
    if !matches!(j, Json::Object(_)) {
        return Err(field("(top level)", "an object"));
    }
    match j.get("schema").and_then(Json::as_f64) {
        Some(1.0) => {}
        Some(s) => {
            return Err(ReportError::Schema {
                path: path.to_path_buf(),
                found: s.to_string(),
                supported: 1,
            })
        }
        None => return Err(field("schema", "a number")),
    }
    let whole = |v: Option<&Json>, name: &'static str| -> Result<Option<u64>, ReportError> {
        match v {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Number(n)) if *n >= 0.0 && n.fract() == 0.0 => Ok(Some(*n as u64)),
            // Role settings are written as strings.
            Some(Json::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| field(name, "a whole number")),
            Some(_) => Err(field(name, "a whole number or null")),
        }
    };
    let hosts = match j.get("hosts") {
        Some(Json::Array(items)) => items
            .iter()
            .map(|h| h.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| field("hosts", "an array of strings"))?,
        None | Some(Json::Null) => Vec::new(),
        Some(_) => return Err(field("hosts", "an array of strings")),
    };
    let files = match j.get("files") {
        Some(Json::Object(fields)) => fields
            .iter()
            .map(|(name, v)| {
                v.get("schema")
                    .and_then(Json::as_f64)
                    .map(|s| (name.clone(), s as u32))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| field("files", "an object of {\"schema\": N}"))?,
        None => Vec::new(),
        Some(_) => return Err(field("files", "an object")),
    };
    Ok(Meta {
        role: opt_string(&j, path, "role", true)?.unwrap_or_default(),
        transport: opt_string(&j, path, "transport", true)?.unwrap_or_default(),
        task: opt_string(&j, path, "task", false)?,
        backend: opt_string(&j, path, "backend", false)?,
        precision: opt_string(&j, path, "precision", false)?,
        addressing: opt_string(&j, path, "addressing", false)?,
        model: opt_string(&j, path, "model", false)?,
        payload_bytes: whole(j.get("payload_bytes"), "payload_bytes")?,
        hosts,
        files,
        finished_requests: whole(j.get("finished_requests"), "finished_requests")?,
    })
}

/// Checks a table's `schema` column (when it has one) against the version this reads.
fn check_schema(t: &Table, supported: u32) -> Result<(), ReportError> {
    let Some(c) = t.find("schema") else {
        return Ok(());
    };
    for row in t.rows() {
        let found = row.text(c);
        if found != supported.to_string() {
            return Err(ReportError::Schema {
                path: t.path.clone(),
                found: found.to_string(),
                supported,
            });
        }
    }
    Ok(())
}

/// load_summary.csv (schema 1): one group per level.
fn read_load_summary(path: &Path) -> Result<Vec<Group>, ReportError> {
    let t = Table::read(path)?;
    check_schema(&t, 1)?;
    let c = |name: &str| t.column(name);
    let (kind, level, stable) = (c("level_kind")?, c("level")?, c("stable")?);
    let (requests, errors, tput) = (c("requests")?, c("errors")?, c("throughput_rps")?);
    let (p50, p99) = (c("p50_us")?, c("p99_us")?);
    let (ccpu, scpu) = (c("client_cpu_s_per_1000")?, c("server_cpu_s_per_1000")?);
    let stages = SUMMARY_STAGE_COLUMNS
        .iter()
        .map(|s| c(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(t.len());
    for row in t.rows() {
        let kind_name = row.text(kind);
        if kind_name != "concurrency" && kind_name != "request_rate" {
            return Err(ReportError::BadValue {
                path: path.to_path_buf(),
                line: row.line,
                column: "level_kind".into(),
                value: kind_name.to_string(),
                expected: "concurrency or request_rate",
            });
        }
        let value = row.f64(level)?;
        let mut st = [0.0; 6];
        for (s, col) in st.iter_mut().zip(&stages) {
            *s = row.f64(*col)?;
        }
        out.push(Group {
            name: format!("{kind_name} {value}"),
            value,
            e2e_us: Vec::new(),
            stages_us: Some(st),
            requests: Some(row.u64(requests)?),
            errors: Some(row.u64(errors)?),
            throughput_rps: Some(row.f64(tput)?),
            p50_us: Some(row.f64(p50)?),
            p99_us: Some(row.f64(p99)?),
            stable: Some(row.bool(stable)?),
            client_cpu_s_per_1000: row.opt_f64(ccpu)?,
            server_cpu_s_per_1000: row.opt_f64(scpu)?,
        });
    }
    Ok(out)
}

/// The per-request columns requests.csv and client_<id>.csv share.
struct RequestColumns {
    status: super::table::Column,
    e2e: super::table::Column,
    /// client_sent, received, started, decoded, preprocessed, inferred, replied, client_received
    stamps: [super::table::Column; 8],
}

impl RequestColumns {
    fn of(t: &Table) -> Result<RequestColumns, ReportError> {
        let c = |n: &str| t.column(n);
        Ok(RequestColumns {
            status: c("status")?,
            e2e: c("e2e_ns")?,
            stamps: [
                c("client_sent_ns")?,
                c("server_received_ns")?,
                c("server_started_ns")?,
                c("server_decoded_ns")?,
                c("server_preprocessed_ns")?,
                c("server_inferred_ns")?,
                c("server_replied_ns")?,
                c("client_received_ns")?,
            ],
        })
    }

    /// (e2e µs, stages in ns) of a successful request; None for a failed one. Every field is
    /// checked either way.
    fn read(&self, row: &Row) -> Result<Option<(f64, [u64; 6])>, ReportError> {
        let status = row.u64(self.status)?;
        let e2e = row.u64(self.e2e)?;
        let mut s = [0u64; 8];
        for (v, c) in s.iter_mut().zip(&self.stamps) {
            *v = row.u64(*c)?;
        }
        if status != 0 {
            return Ok(None);
        }
        let d = |a: usize, b: usize| s[b].saturating_sub(s[a]);
        Ok(Some((
            e2e as f64 / 1e3,
            [d(0, 1), d(1, 2), d(2, 3), d(3, 4), d(4, 5), d(6, 7)],
        )))
    }
}

/// Per-group accumulation of request rows.
#[derive(Default)]
struct Acc {
    e2e_us: Vec<f64>,
    stage_sum_ns: [f64; 6],
    ok: u64,
    failed: u64,
}

impl Acc {
    fn add(&mut self, r: Option<(f64, [u64; 6])>) {
        match r {
            Some((e2e, st)) => {
                self.e2e_us.push(e2e);
                for (sum, v) in self.stage_sum_ns.iter_mut().zip(st) {
                    *sum += v as f64;
                }
                self.ok += 1;
            }
            None => self.failed += 1,
        }
    }

    /// Into `g`: sorted latencies; stage means, counts and percentiles where the group has
    /// none from a summary.
    fn into_group(mut self, g: &mut Group) {
        self.e2e_us.sort_by(f64::total_cmp);
        if self.ok > 0 && g.stages_us.is_none() {
            g.stages_us = Some(self.stage_sum_ns.map(|s| s / self.ok as f64 / 1e3));
        }
        g.requests.get_or_insert(self.ok);
        g.errors.get_or_insert(self.failed);
        if !self.e2e_us.is_empty() {
            g.p50_us.get_or_insert(quantile(&self.e2e_us, 0.5));
            g.p99_us.get_or_insert(quantile(&self.e2e_us, 0.99));
        }
        g.e2e_us = self.e2e_us;
    }
}

/// Nearest-rank quantile of sorted values (as stats::Summary).
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    sorted[((p * n as f64).ceil() as usize).clamp(1, n) - 1]
}

/// requests.csv (schema 2) into `groups`, matched by its `level` column (new groups for
/// levels the summary lacks).
fn read_requests(path: &Path, groups: &mut Vec<Group>) -> Result<(), ReportError> {
    let t = Table::read(path)?;
    let cols = RequestColumns::of(&t)?;
    let level = t.column("level")?;
    let kind = groups
        .first()
        .and_then(|g| g.name.split_whitespace().next())
        .unwrap_or("level")
        .to_string();
    let mut accs: Vec<(f64, Acc)> = groups.iter().map(|g| (g.value, Acc::default())).collect();
    for row in t.rows() {
        let r = cols.read(&row)?;
        let v = row.f64(level)?;
        let at = match accs.iter().position(|(lv, _)| *lv == v) {
            Some(i) => i,
            None => {
                accs.push((v, Acc::default()));
                groups.push(Group::named(format!("{kind} {v}"), v));
                accs.len() - 1
            }
        };
        accs[at].1.add(r);
    }
    for (g, (_, acc)) in groups.iter_mut().zip(accs) {
        acc.into_group(g);
    }
    Ok(())
}

/// The client_<id>.csv files directly in `dir`, sorted by name.
fn client_csvs(dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|source| ReportError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("client_") && name.ends_with(".csv") && !name.contains("summary") {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The client CSVs of one folder as one group.
fn read_clients(files: &[PathBuf], g: &mut Group) -> Result<(), ReportError> {
    let mut acc = Acc::default();
    for f in files {
        let t = Table::read(f)?;
        let cols = RequestColumns::of(&t)?;
        for row in t.rows() {
            acc.add(cols.read(&row)?);
        }
    }
    acc.into_group(g);
    Ok(())
}

/// `clients_<N>` subfolders (multi_client -m single|range with -s), by N.
fn level_folders(dir: &Path) -> Result<Vec<(u64, PathBuf)>, ReportError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ReportError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("clients_")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// multi_client_summary.csv: throughput and percentiles per client count.
fn read_multi_summary(path: &Path, groups: &mut Vec<Group>) -> Result<(), ReportError> {
    let t = Table::read(path)?;
    let c = |n: &str| t.column(n);
    let (clients, requests, errors) = (c("clients")?, c("requests")?, c("errors")?);
    let (tput, p50, p99) = (c("throughput_rps")?, c("p50_ns")?, c("p99_ns")?);
    for row in t.rows() {
        let n = row.u64(clients)? as f64;
        let at = match groups.iter().position(|g| g.value == n) {
            Some(i) => i,
            None => {
                groups.push(Group::named(format!("clients {n}"), n));
                groups.len() - 1
            }
        };
        let g = &mut groups[at];
        g.requests = Some(row.u64(requests)?);
        g.errors = Some(row.u64(errors)?);
        g.throughput_rps = Some(row.f64(tput)?);
        g.p50_us = Some(row.f64(p50)? / 1e3);
        g.p99_us = Some(row.f64(p99)? / 1e3);
    }
    groups.sort_by(|a, b| a.value.total_cmp(&b.value));
    Ok(())
}

/// resources.csv (schema 1): the CPU seconds (user + system) spent between its first and
/// last samples (the columns are cumulative since the process started, so model loading
/// before the sampler started is left out, as in the role's own `resources:` line). None
/// with fewer than two samples.
fn read_resources_cpu(path: &Path) -> Result<Option<f64>, ReportError> {
    let t = Table::read(path)?;
    check_schema(&t, 1)?;
    let (user, system) = (t.column("cpu_user_s")?, t.column("cpu_system_s")?);
    let (mut first, mut last) = (None, None);
    for row in t.rows() {
        let cpu = row.f64(user)? + row.f64(system)?;
        first.get_or_insert(cpu);
        last = Some(cpu);
    }
    Ok(match (first, last) {
        (Some(a), Some(b)) if t.len() >= 2 => Some((b - a).max(0.0)),
        _ => None,
    })
}

/// Reads one results folder. `label` overrides the one made from run.json (else the
/// folder's name when it has none).
pub fn read_folder(dir: &Path, label: Option<&str>) -> Result<Run, ReportError> {
    if !dir.is_dir() {
        return Err(ReportError::NotAFolder {
            path: dir.to_path_buf(),
        });
    }
    let run_json = dir.join("run.json");
    let meta = if run_json.exists() {
        Some(read_run_json(&run_json)?)
    } else {
        None
    };
    if let Some(m) = &meta {
        for (file, _) in &m.files {
            if !dir.join(file).exists() {
                return Err(ReportError::MissingFile {
                    path: dir.to_path_buf(),
                    file: file.clone(),
                });
            }
        }
    }
    let mut groups = Vec::new();
    let mut found = meta.is_some();
    let summary = dir.join("load_summary.csv");
    if summary.exists() {
        groups = read_load_summary(&summary)?;
        found = true;
    }
    let requests = dir.join("requests.csv");
    if requests.exists() {
        read_requests(&requests, &mut groups)?;
        found = true;
    }
    let clients = client_csvs(dir)?;
    if !clients.is_empty() && !requests.exists() {
        let mut g = Group::default();
        read_clients(&clients, &mut g)?;
        groups.push(g);
        found = true;
    }
    for (n, sub) in level_folders(dir)? {
        let files = client_csvs(&sub)?;
        if files.is_empty() {
            continue;
        }
        let mut g = Group::named(format!("clients {n}"), n as f64);
        read_clients(&files, &mut g)?;
        groups.push(g);
        found = true;
    }
    let multi = dir.join("multi_client_summary.csv");
    if multi.exists() {
        read_multi_summary(&multi, &mut groups)?;
        found = true;
    }
    let resources = dir.join("resources.csv");
    if resources.exists() {
        let cpu = read_resources_cpu(&resources)?;
        // A serving role's own cost: its CPU over the requests it finished. (The load
        // generator's is per level, in load_summary.csv.)
        if let (Some(m), Some(cpu)) = (&meta, cpu) {
            if m.role != "multi_client" {
                if let Some(n) = m.finished_requests.filter(|&n| n > 0) {
                    if groups.is_empty() {
                        groups.push(Group::default());
                    }
                    for g in &mut groups {
                        g.server_cpu_s_per_1000
                            .get_or_insert(cpu / n as f64 * 1000.0);
                    }
                }
            }
        }
    }
    if !found {
        return Err(ReportError::NotAResultsFolder {
            path: dir.to_path_buf(),
        });
    }
    let label = match (label, &meta) {
        (Some(l), _) => l.to_string(),
        (None, Some(m)) => m.label(),
        (None, None) => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string()),
    };
    Ok(Run {
        folder: dir.to_path_buf(),
        label,
        meta,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hacserve-report-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const HEADER: &str = "client_id,request_id,task,status,client_sent_ns,server_received_ns,server_started_ns,server_decoded_ns,server_preprocessed_ns,server_inferred_ns,server_replied_ns,client_received_ns,e2e_ns,top1";

    #[test]
    fn client_csvs_become_one_group_with_stage_means() {
        let d = folder("clients");
        std::fs::write(
            d.join("client_0.csv"),
            format!("{HEADER}\n0,1,4,0,100,1100,3100,6100,10100,15100,21100,28100,28000,5\n0,2,4,7,0,0,0,0,0,0,0,0,10,-1\n"),
        )
        .unwrap();
        let run = read_folder(&d, None).unwrap();
        assert_eq!(run.groups.len(), 1);
        let g = &run.groups[0];
        assert_eq!(g.e2e_us, vec![28.0]);
        assert_eq!(g.stages_us, Some([1.0, 2.0, 3.0, 4.0, 5.0, 7.0]));
        assert_eq!((g.requests, g.errors), (Some(1), Some(1)));
        assert!(run.label.starts_with("hacserve-report-clients"));
        // A garbled value is named by file, line and column.
        std::fs::write(
            d.join("client_1.csv"),
            format!("{HEADER}\n0,1,4,0,100,x,3100,6100,10100,15100,21100,28100,28000,5\n"),
        )
        .unwrap();
        let e = read_folder(&d, None).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "client_1.csv line 2: column server_received_ns: \"x\" is not a whole number"
            ),
            "{e}"
        );
    }

    #[test]
    fn run_json_labels_and_lists_files() {
        let d = folder("runjson");
        let info = crate::results::RunInfo {
            role: "zmq_server".into(),
            transport: "zmq".into(),
            backend: Some("tract-cpu x1 threads".into()),
            hosts: vec!["127.0.0.1:5555".into()],
            files: vec![("resources.csv".into(), 1)],
            extra: vec![("finished_requests".into(), "500".into())],
            ..Default::default()
        };
        info.write(&d, 0).unwrap();
        let e = read_folder(&d, None).unwrap_err().to_string();
        assert!(
            e.ends_with("run.json lists resources.csv but it is missing"),
            "{e}"
        );
        std::fs::write(
            d.join("resources.csv"),
            "schema,time_ns,elapsed_s,cpu_user_s,cpu_system_s,rss_bytes,gpu_memory_used_bytes,gpu_utilization_percent\n1,0,0.0,0.5,0.25,100,,\n1,0,0.02,1.5,0.5,100,,\n",
        )
        .unwrap();
        let run = read_folder(&d, None).unwrap();
        assert_eq!(
            run.label,
            "zmq zmq_server tract-cpu x1 threads -> 127.0.0.1:5555"
        );
        assert_eq!(run.groups.len(), 1);
        // 1.25 CPU-s between the two samples, over 500 requests.
        assert_eq!(run.groups[0].server_cpu_s_per_1000, Some(2.5));
        std::fs::write(
            d.join("resources.csv"),
            "schema,cpu_user_s,cpu_system_s\n2,1,1\n",
        )
        .unwrap();
        let e = read_folder(&d, None).unwrap_err().to_string();
        assert!(
            e.ends_with("resources.csv: schema 2, this report reads schema 1"),
            "{e}"
        );
        std::fs::write(d.join("run.json"), "{\"schema\": 1, \"role\": 3}").unwrap();
        let e = read_folder(&d, None).unwrap_err().to_string();
        assert!(e.ends_with("run.json: field role must be a string"), "{e}");
        let empty = folder("empty");
        let e = read_folder(&empty, None).unwrap_err().to_string();
        assert!(e.contains("not a results folder"), "{e}");
    }
}

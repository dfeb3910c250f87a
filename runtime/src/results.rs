//! Self-describing results folders: `run.json` names what produced the files beside it
//! (role, transport, task, payload, model, backend, hosts, revision, command line, start
//! time, machine) and the versions of their column sets (docs/results.md).

use std::fmt::Write as _;
use std::path::Path;

/// Version of run.json's own fields.
pub const RUN_JSON_SCHEMA: u32 = 1;

/// One run's description. Fields a role does not have stay None and are written as null.
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    pub role: String,
    pub transport: String,
    pub task: Option<String>,
    pub payload_bytes: Option<usize>,
    pub model: Option<String>,
    pub backend: Option<String>,
    pub precision: Option<String>,
    pub addressing: Option<String>,
    /// The peers this run talked to or listened on (`host:port`).
    pub hosts: Vec<String>,
    pub git_revision: String,
    pub command_line: Vec<String>,
    /// Files in the folder and their column-set versions, e.g. ("requests.csv", 2).
    pub files: Vec<(String, u32)>,
    /// Anything else worth keeping (levels, window rule, ...), as (key, value) strings.
    pub extra: Vec<(String, String)>,
}

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn opt(v: &Option<String>) -> String {
    v.as_deref()
        .map(json_string)
        .unwrap_or_else(|| "null".into())
}

/// RFC 3339 UTC time (seconds) of a Unix time: the civil-from-days algorithm (H. Hinnant).
pub fn utc_timestamp(unix_secs: u64) -> String {
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let secs = unix_secs % 86_400;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// This machine: logical cores, the CPU model from /proc/cpuinfo, the GPUs NVML names.
fn machine_json() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
    });
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string());
    let gpus: Vec<String> = match hacserve_ffi::nvml::Nvml::load() {
        Ok(n) => (0..n.devices())
            .map(|i| n.name(i).unwrap_or_else(|| format!("GPU {i}")))
            .collect(),
        Err(_) => Vec::new(),
    };
    format!(
        "{{\"hostname\":{},\"cores\":{cores},\"cpu\":{},\"gpus\":[{}]}}",
        opt(&host),
        opt(&cpu),
        gpus.iter()
            .map(|g| json_string(g))
            .collect::<Vec<_>>()
            .join(",")
    )
}

impl RunInfo {
    /// The JSON text, with `start_unix` as the start time.
    pub fn json(&self, start_unix: u64) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| json_string(s))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut s = String::new();
        let _ = write!(
            s,
            "{{\n  \"schema\": {RUN_JSON_SCHEMA},\n  \"role\": {},\n  \"transport\": {},\n  \"task\": {},\n  \"payload_bytes\": {},\n  \"model\": {},\n  \"backend\": {},\n  \"precision\": {},\n  \"addressing\": {},\n  \"hosts\": [{}],\n  \"git_revision\": {},\n  \"command_line\": [{}],\n  \"start_time\": {},\n  \"start_unix\": {start_unix},\n  \"machine\": {},\n  \"files\": {{{}}}",
            json_string(&self.role),
            json_string(&self.transport),
            opt(&self.task),
            self.payload_bytes.map_or("null".into(), |n| n.to_string()),
            opt(&self.model),
            opt(&self.backend),
            opt(&self.precision),
            opt(&self.addressing),
            list(&self.hosts),
            json_string(&self.git_revision),
            list(&self.command_line),
            json_string(&utc_timestamp(start_unix)),
            machine_json(),
            self.files
                .iter()
                .map(|(f, v)| format!("{}: {{\"schema\": {v}}}", json_string(f)))
                .collect::<Vec<_>>()
                .join(", "),
        );
        for (k, v) in &self.extra {
            let _ = write!(s, ",\n  {}: {}", json_string(k), json_string(v));
        }
        s.push_str("\n}\n");
        s
    }

    /// Writes `folder/run.json`.
    pub fn write(&self, folder: &Path, start_unix: u64) -> std::io::Result<()> {
        std::fs::create_dir_all(folder)?;
        std::fs::write(folder.join("run.json"), self.json(start_unix))
    }
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    crate::clock::realtime_ns() / 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_strings() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(1_796_186_400), "2026-12-02T04:40:00Z");
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    #[test]
    fn run_json_has_every_field() {
        let info = RunInfo {
            role: "multi_client".into(),
            transport: "zmq".into(),
            task: Some("echo".into()),
            payload_bytes: Some(64),
            hosts: vec!["127.0.0.1:5555".into()],
            git_revision: "abc".into(),
            command_line: vec!["multi_client".into(), "-t".into(), "3".into()],
            files: vec![("requests.csv".into(), 2)],
            ..Default::default()
        };
        let j = info.json(0);
        for key in [
            "\"role\": \"multi_client\"",
            "\"task\": \"echo\"",
            "\"payload_bytes\": 64",
            "\"backend\": null",
            "\"hosts\": [\"127.0.0.1:5555\"]",
            "\"start_time\": \"1970-01-01T00:00:00Z\"",
            "\"cores\":",
            "\"requests.csv\": {\"schema\": 2}",
        ] {
            assert!(j.contains(key), "{key} missing from {j}");
        }
    }
}

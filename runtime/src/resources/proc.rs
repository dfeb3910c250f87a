//! CPU time and resident memory of a process, from getrusage (this process) or from
//! `/proc/<pid>/stat` (another one on this host, e.g. the server a load generator measures).

use hacserve_ffi::usage::{clock_ticks_per_second, page_size, self_usage};

/// CPU seconds and resident memory at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessUsage {
    pub user_s: f64,
    pub system_s: f64,
    /// Resident set now, bytes (0 when unknown).
    pub rss_bytes: u64,
}

impl ProcessUsage {
    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.system_s
    }
}

/// This process: CPU from getrusage (µs resolution), RSS from /proc/self/statm.
pub fn self_process() -> ProcessUsage {
    let u = self_usage();
    ProcessUsage {
        user_s: u.user_us as f64 / 1e6,
        system_s: u.system_us as f64 / 1e6,
        rss_bytes: statm_rss("self").unwrap_or(0),
    }
}

/// Another process by pid: None when it is gone or /proc cannot be read.
pub fn other_process(pid: u32) -> Option<ProcessUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (user, system) = parse_stat_times(&stat)?;
    let hz = clock_ticks_per_second() as f64;
    Some(ProcessUsage {
        user_s: user as f64 / hz,
        system_s: system as f64 / hz,
        rss_bytes: statm_rss(&pid.to_string()).unwrap_or(0),
    })
}

/// utime and stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in clock ticks. The
/// command name (field 2) may hold spaces and parentheses: fields are counted after its
/// last ')'.
pub fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': state is field 3, so utime (14) is the 12th from here.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

fn statm_rss(pid: &str) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_after_an_awkward_name() {
        let line = "1234 (a b) c)) S 1 2 3 4 5 6 7 8 9 10 111 222 13 14 15";
        assert_eq!(parse_stat_times(line), Some((111, 222)));
        assert_eq!(parse_stat_times("garbage"), None);
    }

    #[test]
    fn this_process_is_readable_both_ways() {
        let mine = self_process();
        assert!(mine.rss_bytes > 0);
        let via_proc = other_process(std::process::id()).expect("/proc/<pid>/stat");
        assert!(via_proc.rss_bytes > 0);
        // Busy for a moment, so both clocks move.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 50 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0 && self_process().cpu_s() > mine.cpu_s());
    }
}

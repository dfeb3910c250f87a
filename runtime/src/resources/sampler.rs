//! The resources sampler every serving role and the load generator run beside their work: a
//! thread that every period (20 ms by default, as the original logged) reads the process's
//! CPU time and resident memory and, where NVML loads, the GPUs' memory and utilisation;
//! appends a row to `resources.csv` when given a path and keeps the latest sample for the
//! metrics endpoint. Off the hot path: nothing here touches a request.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hacserve_ffi::nvml::Nvml;

use super::proc::self_process;
use crate::clock::realtime_ns;

/// Version of `resources.csv`'s columns (docs/results.md).
pub const RESOURCES_SCHEMA: u32 = 1;
pub const RESOURCES_HEADER: &str = "schema,time_ns,elapsed_s,cpu_user_s,cpu_system_s,rss_bytes,gpu_memory_used_bytes,gpu_utilization_percent";
/// The original's period.
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(20);

/// The latest sample, for readers on other threads (metrics endpoint): CPU in µs, memory in
/// bytes; the GPU fields stay `u64::MAX` without NVML.
#[derive(Debug)]
pub struct Latest {
    pub cpu_user_us: AtomicU64,
    pub cpu_system_us: AtomicU64,
    pub rss_bytes: AtomicU64,
    pub gpu_memory_used_bytes: AtomicU64,
    pub gpu_utilization_percent: AtomicU64,
    pub samples: AtomicU64,
}

impl Default for Latest {
    fn default() -> Self {
        Latest {
            cpu_user_us: AtomicU64::new(0),
            cpu_system_us: AtomicU64::new(0),
            rss_bytes: AtomicU64::new(0),
            gpu_memory_used_bytes: AtomicU64::new(u64::MAX),
            gpu_utilization_percent: AtomicU64::new(u64::MAX),
            samples: AtomicU64::new(0),
        }
    }
}

/// What a sampler saw over its whole run.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResourceSummary {
    pub samples: u64,
    pub secs: f64,
    pub cpu_user_s: f64,
    pub cpu_system_s: f64,
    pub peak_rss_bytes: u64,
    pub gpu: bool,
}

impl ResourceSummary {
    pub fn cpu_s(&self) -> f64 {
        self.cpu_user_s + self.cpu_system_s
    }

    /// `resources: N samples every P ms over S s: CPU U s user + Y s system, peak RSS M MiB
    /// [, C CPU-s per 1000 requests]`.
    pub fn line(&self, period: Duration, requests: Option<u64>) -> String {
        let per = match requests {
            Some(n) if n > 0 => format!(
                ", {:.4} CPU-s per 1000 requests ({n} requests)",
                self.cpu_s() / n as f64 * 1000.0
            ),
            _ => String::new(),
        };
        format!(
            "resources: {} samples every {} ms over {:.1} s: CPU {:.3} s user + {:.3} s system, peak RSS {:.1} MiB{}{per}",
            self.samples,
            period.as_millis(),
            self.secs,
            self.cpu_user_s,
            self.cpu_system_s,
            self.peak_rss_bytes as f64 / f64::from(1 << 20),
            if self.gpu { "" } else { ", no GPU columns (NVML unavailable)" },
        )
    }
}

/// A running sampler; [`Sampler::finish`] stops it and returns its summary.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    latest: Arc<Latest>,
    handle: Option<thread::JoinHandle<io::Result<ResourceSummary>>>,
    pub period: Duration,
}

impl Sampler {
    /// Starts sampling every `period`, appending rows to `csv` (created, header first) when
    /// given.
    pub fn start(csv: Option<&Path>, period: Duration) -> io::Result<Sampler> {
        let period = period.max(Duration::from_millis(1));
        let mut out = match csv {
            Some(path) => {
                let mut w =
                    BufWriter::new(std::fs::File::create(path).map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?);
                writeln!(w, "{RESOURCES_HEADER}")?;
                Some((w, PathBuf::from(path)))
            }
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(Latest::default());
        let (stop2, latest2) = (stop.clone(), latest.clone());
        let handle = thread::Builder::new()
            .name("resources".into())
            .spawn(move || {
                let nvml = match Nvml::load() {
                    Ok(n) if n.devices() > 0 => Some(n),
                    Ok(_) => {
                        log::warn!("resources: NVML lists no GPU: GPU columns stay empty");
                        None
                    }
                    Err(e) => {
                        log::warn!("resources: NVML unavailable ({e}): GPU columns stay empty");
                        None
                    }
                };
                let start = Instant::now();
                let first = self_process();
                let mut summary = ResourceSummary {
                    gpu: nvml.is_some(),
                    ..Default::default()
                };
                let mut next = start;
                let mut last;
                loop {
                    let u = self_process();
                    let gpu = nvml.as_ref().map(|n| {
                        (0..n.devices())
                            .filter_map(|i| n.sample(i).ok())
                            .fold((0u64, 0u32), |(m, p), s| {
                                (m + s.memory_used, p.max(s.utilization_percent))
                            })
                    });
                    latest2
                        .cpu_user_us
                        .store((u.user_s * 1e6) as u64, Ordering::Relaxed);
                    latest2
                        .cpu_system_us
                        .store((u.system_s * 1e6) as u64, Ordering::Relaxed);
                    latest2.rss_bytes.store(u.rss_bytes, Ordering::Relaxed);
                    if let Some((mem, util)) = gpu {
                        latest2.gpu_memory_used_bytes.store(mem, Ordering::Relaxed);
                        latest2
                            .gpu_utilization_percent
                            .store(u64::from(util), Ordering::Relaxed);
                    }
                    latest2.samples.fetch_add(1, Ordering::Relaxed);
                    summary.samples += 1;
                    summary.peak_rss_bytes = summary.peak_rss_bytes.max(u.rss_bytes);
                    last = u;
                    if let Some((w, _)) = out.as_mut() {
                        let (mem, util) = match gpu {
                            Some((m, p)) => (m.to_string(), p.to_string()),
                            None => (String::new(), String::new()),
                        };
                        writeln!(
                            w,
                            "{RESOURCES_SCHEMA},{},{:.6},{:.6},{:.6},{},{mem},{util}",
                            realtime_ns(),
                            start.elapsed().as_secs_f64(),
                            u.user_s,
                            u.system_s,
                            u.rss_bytes
                        )?;
                    }
                    if stop2.load(Ordering::Acquire) {
                        break;
                    }
                    // Fixed-rate ticks: a slow sample does not shift the ones after it.
                    next += period;
                    let now = Instant::now();
                    if next > now {
                        thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
                if let Some((mut w, path)) = out {
                    w.flush().map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?;
                }
                summary.secs = start.elapsed().as_secs_f64();
                summary.cpu_user_s = last.user_s - first.user_s;
                summary.cpu_system_s = last.system_s - first.system_s;
                Ok(summary)
            })?;
        Ok(Sampler {
            stop,
            latest,
            handle: Some(handle),
            period,
        })
    }

    pub fn latest(&self) -> Arc<Latest> {
        self.latest.clone()
    }

    /// Takes one last sample, stops and returns the summary.
    pub fn finish(mut self) -> io::Result<ResourceSummary> {
        self.stop.store(true, Ordering::Release);
        match self.handle.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("the resources thread panicked")),
            None => Ok(ResourceSummary::default()),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

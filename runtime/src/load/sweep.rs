//! The controller: for each level, start the threads over their connections, warm up, then
//! measure windows until the last three are stable or `max_trials` windows were measured;
//! a level that never stabilises is reported as unstable with its last three windows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hacserve_ffi::signal;

use super::driver::{
    drive, set_targets, Connections, LevelShared, RequestLog, ThreadLoad, ThreadPost,
};
use super::link::LoadLink;
use super::plan::{spread, Distribution, Level};
use super::progress::Progress;
use super::window::{stable, WindowStats};
use super::LoadError;
use crate::resources::{other_process, self_process};
use crate::server::worker::pin_current_thread;

/// How often a [`Progress`] gets a live look during a window.
const TICK: Duration = Duration::from_millis(250);

/// How a window ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WindowRule {
    /// After this long.
    Interval(Duration),
    /// After this many finished requests (or `limit`, whichever first).
    Requests { count: u64, limit: Duration },
}

#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub levels: Vec<Level>,
    pub distribution: Distribution,
    pub window: WindowRule,
    pub stability_percent: f64,
    pub max_trials: usize,
    /// Requests finished before the first window of each level (not measured).
    pub warmup: u64,
    pub threads: usize,
    pub depth: usize,
    pub timeout: Duration,
    pub busy_poll: bool,
    pub pin: bool,
    /// First core to pin the threads to (the next ones follow).
    pub first_core: usize,
    pub max_reply: usize,
    /// The measured server's pid (same host), for its CPU time per window.
    pub server_pid: Option<u32>,
    /// Rows of the per-request log kept per thread (0: none).
    pub log_rows_per_thread: usize,
}

/// One level's result: its last three windows merged.
pub struct LevelResult {
    pub level: Level,
    pub stable: bool,
    /// Windows measured.
    pub trials: usize,
    pub stats: WindowStats,
}

/// Everything a sweep produced.
pub struct SweepResult {
    pub levels: Vec<LevelResult>,
    /// Per-request rows (level index, record, send lag) when a log was asked for.
    pub log: Vec<RequestLog>,
    /// True when a stop (SIGINT) cut the sweep short.
    pub interrupted: bool,
}

/// Runs every level over `conns`, one after another.
pub fn sweep<L: LoadLink>(
    conns: &mut Connections<L>,
    opts: &SweepOptions,
    progress: &dyn Progress,
) -> Result<SweepResult, LoadError> {
    let threads = opts.threads.clamp(1, conns.links.len().max(1));
    // Every level is checked before the first runs: a sweep does not die half-way.
    for level in &opts.levels {
        if let Level::Concurrency(c) = *level {
            spread(c, conns.links.len(), opts.depth)?;
        }
    }
    let mut logs: Vec<RequestLog> = (0..threads)
        .map(|_| RequestLog::with_capacity(opts.log_rows_per_thread))
        .collect();
    let mut results = Vec::new();
    let mut interrupted = false;
    for (index, &level) in opts.levels.iter().enumerate() {
        if signal::stop_requested() {
            interrupted = true;
            break;
        }
        for log in &mut logs {
            log.level_index = index as u32;
        }
        progress.level_started(level, index, opts.levels.len(), opts.max_trials.max(1));
        let r = run_level(conns, level, threads, opts, &mut logs, progress)?;
        progress.level_done(&r);
        interrupted |= signal::stop_requested();
        results.push(r);
    }
    Ok(SweepResult {
        levels: results,
        log: logs,
        interrupted,
    })
}

fn run_level<L: LoadLink>(
    conns: &mut Connections<L>,
    level: Level,
    threads: usize,
    opts: &SweepOptions,
    logs: &mut [RequestLog],
    progress: &dyn Progress,
) -> Result<LevelResult, LoadError> {
    let n = conns.links.len();
    match level {
        Level::Concurrency(c) => {
            let targets = spread(c, n, opts.depth)?;
            set_targets(&mut conns.states, &targets);
        }
        Level::Rate(_) => set_targets(&mut conns.states, &vec![0; n]),
    }
    let shared = LevelShared {
        origin: Instant::now(),
        epoch: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        drain_ns: opts.timeout.as_nanos() as u64,
        timeout_ns: opts.timeout.as_nanos() as u64,
        busy_poll: opts.busy_poll,
        max_reply: opts.max_reply,
    };
    let posts: Vec<ThreadPost> = (0..threads).map(|_| ThreadPost::default()).collect();
    // Connections in contiguous chunks, one per thread.
    let per = n.div_ceil(threads);
    let outcome = thread::scope(|scope| {
        let mut handles = Vec::new();
        let chunks = conns
            .links
            .chunks_mut(per)
            .zip(conns.states.chunks_mut(per))
            .zip(posts.iter())
            .zip(logs.iter_mut());
        for (t, (((links, states), post), log)) in chunks.enumerate() {
            let load = match level {
                Level::Concurrency(_) => ThreadLoad::Closed,
                Level::Rate(rate) => {
                    let share = rate / threads as f64;
                    ThreadLoad::Open {
                        rate: share,
                        distribution: opts.distribution,
                        // Constant schedules interleave: thread t starts t/rate later.
                        first_ns: 1e9 * t as f64 / rate,
                        seed: 0x5eed ^ ((t as u64) << 32) ^ rate.to_bits(),
                    }
                }
            };
            let shared = &shared;
            let log = (opts.log_rows_per_thread > 0).then_some(log);
            let handle = thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn_scoped(scope, move || {
                    if opts.pin {
                        pin_current_thread(opts.first_core + t, &format!("load thread {t}"));
                    }
                    drive(links, states, load, shared, post, log)
                })
                .map_err(LoadError::Io)?;
            handles.push(handle);
        }
        let measured = measure(level, &shared, &posts, opts, progress);
        shared.stop.store(true, Ordering::Release);
        let mut first_error = None;
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(_) => {
                    first_error =
                        first_error.or(Some(LoadError::Config("a load thread panicked".into())))
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(measured),
        }
    })?;
    Ok(outcome)
}

/// The controller's side of a level: warm-up, then windows until stable or out of trials.
fn measure(
    level: Level,
    shared: &LevelShared,
    posts: &[ThreadPost],
    opts: &SweepOptions,
    progress: &dyn Progress,
) -> LevelResult {
    let finished = || {
        posts
            .iter()
            .map(|p| p.finished.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let limit = match opts.window {
        WindowRule::Interval(d) => d,
        WindowRule::Requests { limit, .. } => limit,
    };
    let wait_until = |done: &dyn Fn() -> bool, limit: Duration| {
        let t = Instant::now();
        let base = finished();
        let mut next_tick = TICK;
        while !done() && t.elapsed() < limit && !signal::stop_requested() {
            thread::sleep(Duration::from_millis(1));
            if t.elapsed() >= next_tick {
                next_tick += TICK;
                progress.tick(level, finished() - base, t.elapsed().as_secs_f64());
            }
        }
    };
    // Warm-up: its replies land in epoch 0's figures, which the first flush discards.
    wait_until(&|| finished() >= opts.warmup, limit.max(opts.timeout));
    let collect = |epoch: u64| -> WindowStats {
        shared.epoch.store(epoch, Ordering::Release);
        // A thread answers at its next loop turn (at most ~1 ms in poll); one that has ended
        // (an error) never does, which the bounded wait covers.
        let t = Instant::now();
        while posts
            .iter()
            .any(|p| p.flushed.load(Ordering::Acquire) != epoch)
            && t.elapsed() < Duration::from_secs(5)
        {
            thread::sleep(Duration::from_micros(200));
        }
        let mut w = WindowStats::new();
        for p in posts {
            if let Ok(mut m) = p.mailbox.lock() {
                w.merge(&m);
                m.reset();
            }
        }
        w
    };
    let server_cpu = || opts.server_pid.and_then(other_process).map(|u| u.cpu_s());
    let _warmup = collect(1);
    let mut window_start = Instant::now();
    let mut cpu_start = self_process().cpu_s();
    let mut server_start = server_cpu();
    let mut windows: Vec<WindowStats> = Vec::new();
    let mut is_stable = false;
    let mut trials = 0;
    for trial in 1..=opts.max_trials.max(1) {
        let before = finished();
        match opts.window {
            WindowRule::Interval(d) => wait_until(&|| false, d),
            WindowRule::Requests { count, limit } => {
                wait_until(&|| finished() >= before + count, limit)
            }
        }
        let mut w = collect(trial as u64 + 1);
        let now = Instant::now();
        let cpu = self_process().cpu_s();
        let server = server_cpu();
        w.secs = (now - window_start).as_secs_f64();
        w.client_cpu_s = cpu - cpu_start;
        w.server_cpu_s = match (server_start, server) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        (window_start, cpu_start, server_start) = (now, cpu, server);
        trials = trial;
        progress.window(level, trial, opts.max_trials, &w);
        windows.push(w);
        if windows.len() > 3 {
            windows.remove(0);
        }
        if stable(&windows.iter().collect::<Vec<_>>(), opts.stability_percent) {
            is_stable = true;
            break;
        }
        if signal::stop_requested() {
            break;
        }
    }
    let mut stats = WindowStats::new();
    for w in &windows {
        stats.merge(w);
    }
    LevelResult {
        level,
        stable: is_stable,
        trials,
        stats,
    }
}

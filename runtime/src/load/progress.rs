//! What a sweep tells its user while it runs: a [`Progress`] gets each level's start, a live
//! tick a few times a second, each window's figures and the level's end. The CLI draws a bar
//! on a terminal (bins/cli/progress.rs); [`PlainLines`] writes a line per window otherwise.

use super::plan::Level;
use super::sweep::LevelResult;
use super::window::WindowStats;

pub trait Progress: Sync {
    /// Level `index` of `levels` starts (warm-up first).
    fn level_started(&self, _level: Level, _index: usize, _levels: usize, _max_trials: usize) {}
    /// A live look during a window: requests finished since the window began, and how long ago.
    fn tick(&self, _level: Level, _finished: u64, _secs: f64) {}
    /// Window `trial` ended with these figures.
    fn window(&self, level: Level, trial: usize, max_trials: usize, w: &WindowStats);
    /// The level ended (stable or out of trials).
    fn level_done(&self, _result: &LevelResult) {}
}

/// A line per window on stderr, for logs and pipes.
pub struct PlainLines;

impl Progress for PlainLines {
    fn window(&self, level: Level, trial: usize, max_trials: usize, w: &WindowStats) {
        eprintln!("[load] {}", window_line(level, trial, max_trials, w));
    }
}

/// Says nothing (tests, library callers).
pub struct Silent;

impl Progress for Silent {
    fn window(&self, _: Level, _: usize, _: usize, _: &WindowStats) {}
}

/// One window in words: `concurrency 8: window 2/10: 4312 ok in 1.000 s, ...`.
pub fn window_line(level: Level, trial: usize, max_trials: usize, w: &WindowStats) -> String {
    format!(
        "{level}: window {trial}/{max_trials}: {} ok in {:.3} s, {:.1} req/s  p99 {:.1} us  errors {}  late sends {}",
        w.ok,
        w.secs,
        w.throughput(),
        w.latency_at(0.99) as f64 / 1e3,
        w.errors_total(),
        w.late_sends
    )
}

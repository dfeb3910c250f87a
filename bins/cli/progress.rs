//! The load generator's progress on a terminal: one bar per level (windows measured out of
//! --max-trials) with the live request rate and the last window's p99; each finished window
//! stays above the bar as a line. Off a terminal, plain lines (runtime's PlainLines).

use std::io::IsTerminal;
use std::sync::Mutex;

use hacserve_runtime::load::progress::{window_line, PlainLines, Progress};
use hacserve_runtime::load::window::WindowStats;
use hacserve_runtime::load::{Level, LevelResult};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar when stderr is a terminal, else a line per window.
pub fn for_stderr() -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(Bar::default())
    } else {
        Box::new(PlainLines)
    }
}

#[derive(Default)]
struct Bar {
    current: Mutex<Option<ProgressBar>>,
    /// The last window's p99 in µs, shown beside the live rate.
    last_p99_us: Mutex<Option<f64>>,
}

impl Bar {
    fn with_bar(&self, f: impl FnOnce(&ProgressBar)) {
        if let Ok(guard) = self.current.lock() {
            if let Some(bar) = guard.as_ref() {
                f(bar);
            }
        }
    }
}

impl Progress for Bar {
    fn level_started(&self, level: Level, index: usize, levels: usize, max_trials: usize) {
        let bar = ProgressBar::with_draw_target(
            Some(max_trials as u64),
            ProgressDrawTarget::stderr_with_hz(4),
        );
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:24}] window {pos}/{len} {elapsed:>4} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("level {}/{levels} {level}", index + 1));
        bar.set_message("warming up");
        if let Ok(mut p) = self.last_p99_us.lock() {
            *p = None;
        }
        if let Ok(mut current) = self.current.lock() {
            *current = Some(bar);
        }
    }

    fn tick(&self, _level: Level, finished: u64, secs: f64) {
        let p99 = self.last_p99_us.lock().ok().and_then(|p| *p);
        let rate = if secs > 0.0 {
            finished as f64 / secs
        } else {
            0.0
        };
        let msg = match p99 {
            Some(p) => format!("{rate:.0} req/s now, last window p99 {p:.1} us"),
            None => format!("{rate:.0} req/s now"),
        };
        self.with_bar(|b| b.set_message(msg));
    }

    fn window(&self, level: Level, trial: usize, max_trials: usize, w: &WindowStats) {
        if let Ok(mut p) = self.last_p99_us.lock() {
            *p = Some(w.latency_at(0.99) as f64 / 1e3);
        }
        let line = window_line(level, trial, max_trials, w);
        self.with_bar(|b| {
            b.println(format!("[load] {line}"));
            b.set_position(trial as u64);
        });
    }

    fn level_done(&self, result: &LevelResult) {
        let verdict = if result.stable {
            format!("stable after {} windows", result.trials)
        } else {
            format!("NOT stable after {} windows", result.trials)
        };
        if let Ok(mut current) = self.current.lock() {
            if let Some(bar) = current.take() {
                bar.finish_with_message(verdict);
            }
        }
    }
}

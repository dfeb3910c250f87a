//! A minimal stderr logger for the `log` facade: `-d` turns on debug lines. Log lines are
//! for the operator; measurements go to stdout tables and to the `-f` folder.

use std::io::Write;

struct StderrLogger {
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let t = crate::clock::realtime_ns();
            let _ = writeln!(
                std::io::stderr().lock(),
                "[{}.{:06} {:<5} {}] {}",
                t / 1_000_000_000,
                (t % 1_000_000_000) / 1000,
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once per process: info by default, debug with `debug`.
pub fn init(debug: bool) {
    let level = if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    };
    if log::set_boxed_logger(Box::new(StderrLogger { level })).is_ok() {
        log::set_max_level(level);
    }
}

//! How idle threads wait: the poll modes every role offers (`--poll-mode`) and the one backoff
//! rule every idle loop follows (receive loops, workers, forwarders, the balancer).

use std::thread;
use std::time::Duration;

/// How idle threads wait for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Spin on the queue / socket: lowest latency, one core per thread.
    Busy,
    /// Sleep in poll/park: for shared machines.
    Block,
    /// Sleep until the transport says work arrived: over RDMA the thread blocks on a
    /// completion channel (`ibv_req_notify_cq`, `ibv_get_cq_event`) instead of polling, as
    /// the original server does; everywhere else (ZeroMQ sockets, work queues) it waits as
    /// [`PollMode::Block`] does, which already sleeps on the socket or a park.
    Event,
}

impl PollMode {
    /// Whether idle threads may wait (block or event), rather than spin.
    pub fn waits(self) -> bool {
        self != PollMode::Busy
    }

    /// Parses "busy", "block", "event" or "auto"; auto spins only when every spinning thread gets a
    /// core of its own (plus one left for the rest of the machine).
    pub fn parse(s: &str, spinning_threads: usize) -> Result<PollMode, String> {
        match s {
            "busy" => Ok(PollMode::Busy),
            "block" => Ok(PollMode::Block),
            "event" => Ok(PollMode::Event),
            "auto" => Ok(PollMode::auto_on(spinning_threads, cores())),
            other => Err(format!(
                "poll mode must be busy, block, event or auto, not {other:?}"
            )),
        }
    }

    /// Auto's rule: busy when `spinning_threads` each get one of `cores` with one left over
    /// for the rest of the machine, else block.
    pub fn auto_on(spinning_threads: usize, cores: usize) -> PollMode {
        if cores > spinning_threads {
            PollMode::Busy
        } else {
            PollMode::Block
        }
    }
}

/// The cores this process may run on.
pub fn cores() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// A server's poll modes: its receive loop's and its workers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerPollMode {
    pub receive: PollMode,
    pub workers: PollMode,
}

impl ServerPollMode {
    /// Parses a server's `--poll-mode`: "busy" (every thread spins), "block" (every thread
    /// sleeps when idle), "hybrid" (the receive loop spins, the workers park until a job is
    /// queued) or "auto": busy when the receive loop and each of the `workers` get a core of
    /// their own plus one left over, hybrid when only the receive loop does, block otherwise.
    pub fn parse(s: &str, workers: usize) -> Result<ServerPollMode, String> {
        Self::parse_for(s, workers, cores())
    }

    fn parse_for(s: &str, workers: usize, cores: usize) -> Result<ServerPollMode, String> {
        let both = |m| ServerPollMode {
            receive: m,
            workers: m,
        };
        let hybrid = ServerPollMode {
            receive: PollMode::Busy,
            workers: PollMode::Block,
        };
        match s {
            "busy" => Ok(both(PollMode::Busy)),
            "block" => Ok(both(PollMode::Block)),
            "hybrid" => Ok(hybrid),
            // The receive loop sleeps on completion events, the workers park.
            "event" => Ok(ServerPollMode {
                receive: PollMode::Event,
                workers: PollMode::Block,
            }),
            "auto" if cores > workers + 1 => Ok(both(PollMode::Busy)),
            "auto" if cores > 1 => Ok(hybrid),
            "auto" => Ok(both(PollMode::Block)),
            other => Err(format!(
                "poll mode must be busy, block, hybrid, event or auto, not {other:?}"
            )),
        }
    }

    /// The name `parse` takes for this pair ("busy", "block", "hybrid" or "event").
    pub fn name(&self) -> &'static str {
        match (self.receive, self.workers) {
            (PollMode::Busy, PollMode::Busy) => "busy",
            (PollMode::Busy, _) => "hybrid",
            (PollMode::Block, PollMode::Busy) => "block receive loop, busy workers",
            (PollMode::Block, _) => "block",
            (PollMode::Event, PollMode::Busy) => "event receive loop, busy workers",
            (PollMode::Event, _) => "event",
        }
    }
}

/// The idle rule of every polling loop: after `spins` rounds without progress, a loop in
/// [`PollMode::Block`] may wait up to `wait` per round (a blocking poll's timeout, a park or
/// a sleep); in [`PollMode::Busy`] it never waits. Spinning first keeps a request right behind
/// the last one off the sleep path; waiting after that frees the core.
#[derive(Debug, Clone)]
pub struct Backoff {
    mode: PollMode,
    spins: u32,
    wait: Duration,
    idle: u32,
}

impl Backoff {
    pub const fn new(mode: PollMode, spins: u32, wait: Duration) -> Self {
        Backoff {
            mode,
            spins,
            wait,
            idle: 0,
        }
    }

    /// Changes the longest wait (a loop whose bound depends on its state: an RDMA receive
    /// loop sleeps longer while no client is connected).
    pub fn set_wait(&mut self, wait: Duration) {
        self.wait = wait;
    }

    /// The mode this loop runs in.
    pub fn mode(&self) -> PollMode {
        self.mode
    }

    /// Records one round (`progress`: it did something) and returns how long the loop may
    /// block before its next round: zero while busy-polling or still spinning.
    pub fn round(&mut self, progress: bool) -> Duration {
        match self.past_spins(progress) {
            true => self.wait,
            false => Duration::ZERO,
        }
    }

    /// Counts a round; whether the loop, in a waiting mode, is past its spins.
    fn past_spins(&mut self, progress: bool) -> bool {
        if progress {
            self.idle = 0;
            return false;
        }
        self.idle = self.idle.saturating_add(1);
        self.mode.waits() && self.idle > self.spins
    }

    /// [`round`](Self::round), then waits as it says with nothing to block on: a sleep, or a
    /// spin hint while spinning.
    pub fn pause(&mut self, progress: bool) {
        match self.round(progress) {
            Duration::ZERO => std::hint::spin_loop(),
            d => thread::sleep(d),
        }
    }

    /// A round while a reply is due: never sleeps (a sleep is milliseconds on
    /// an emulated or loaded host), but where the round would wait it yields the core, which
    /// the peer the loop waits for may need.
    pub fn spin_or_yield(&mut self, progress: bool) {
        match self.past_spins(progress) {
            true => thread::yield_now(),
            false => std::hint::spin_loop(),
        }
    }

    /// [`round`](Self::round), then parks the thread (an unpark ends the wait early).
    pub fn park(&mut self, progress: bool) {
        match self.round(progress) {
            Duration::ZERO => std::hint::spin_loop(),
            d => {
                thread::park_timeout(d);
                // Spin again after a wake-up: the next job is often right behind.
                self.idle = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_poll_modes() {
        let busy = ServerPollMode {
            receive: PollMode::Busy,
            workers: PollMode::Busy,
        };
        let block = ServerPollMode {
            receive: PollMode::Block,
            workers: PollMode::Block,
        };
        let hybrid = ServerPollMode {
            receive: PollMode::Busy,
            workers: PollMode::Block,
        };
        assert_eq!(ServerPollMode::parse_for("busy", 4, 1), Ok(busy));
        assert_eq!(ServerPollMode::parse_for("block", 1, 64), Ok(block));
        assert_eq!(ServerPollMode::parse_for("hybrid", 1, 64), Ok(hybrid));
        // auto: a core per spinning thread plus one left over.
        assert_eq!(ServerPollMode::parse_for("auto", 1, 3), Ok(busy));
        assert_eq!(ServerPollMode::parse_for("auto", 1, 2), Ok(hybrid));
        assert_eq!(ServerPollMode::parse_for("auto", 4, 5), Ok(hybrid));
        assert_eq!(ServerPollMode::parse_for("auto", 4, 6), Ok(busy));
        assert_eq!(ServerPollMode::parse_for("auto", 1, 1), Ok(block));
        assert!(ServerPollMode::parse_for("spin", 1, 2)
            .unwrap_err()
            .contains("hybrid"));
        let event = ServerPollMode {
            receive: PollMode::Event,
            workers: PollMode::Block,
        };
        assert_eq!(ServerPollMode::parse_for("event", 1, 64), Ok(event));
        assert_eq!(PollMode::parse("event", 1), Ok(PollMode::Event));
        assert!(PollMode::Event.waits() && PollMode::Block.waits() && !PollMode::Busy.waits());
        for m in [busy, block, hybrid, event] {
            assert_eq!(ServerPollMode::parse_for(m.name(), 1, 2), Ok(m));
        }
    }

    #[test]
    fn backoff_spins_then_waits_only_when_blocking() {
        let wait = Duration::from_millis(5);
        let mut b = Backoff::new(PollMode::Block, 2, wait);
        assert_eq!(b.round(false), Duration::ZERO);
        assert_eq!(b.round(false), Duration::ZERO);
        assert_eq!(b.round(false), wait);
        assert_eq!(b.round(true), Duration::ZERO);
        assert_eq!(b.round(false), Duration::ZERO);
        let mut busy = Backoff::new(PollMode::Busy, 0, wait);
        for _ in 0..10 {
            assert_eq!(busy.round(false), Duration::ZERO);
        }
        let mut none = Backoff::new(PollMode::Block, 0, wait);
        assert_eq!(none.round(false), wait);
    }
}

//! The work queue between a receive loop and its workers: two bounded lock-free lanes, and a
//! byte budget over what the queued requests hold.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::thread::Thread;

use crossbeam_queue::ArrayQueue;

use crate::contract::{Counters, PollMode};

/// Why a job was given back instead of queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its lane holds `--queue-depth` jobs already.
    Full,
    /// Queueing it would take the bytes held by queued jobs past the budget
    /// (`--max-queued-mib`).
    OverBudget,
}

/// Two bounded lock-free queues: priority first, then normal. Each job carries the bytes it
/// holds (its request message); their sum over the queued jobs stays within `budget`.
pub struct WorkQueue<J> {
    priority: ArrayQueue<(J, usize)>,
    normal: ArrayQueue<(J, usize)>,
    budget: usize,
    waiters: OnceLock<Vec<Thread>>,
    mode: PollMode,
    pub counters: Counters,
}

impl<J> WorkQueue<J> {
    /// `depth` jobs per lane, no byte budget.
    pub fn new(depth: usize, mode: PollMode) -> Self {
        Self::with_budget(depth, mode, usize::MAX)
    }

    /// `depth` jobs per lane and at most `budget` bytes held by queued jobs, both lanes
    /// together.
    pub fn with_budget(depth: usize, mode: PollMode, budget: usize) -> Self {
        WorkQueue {
            priority: ArrayQueue::new(depth.max(1)),
            normal: ArrayQueue::new(depth.max(1)),
            budget,
            waiters: OnceLock::new(),
            mode,
            counters: Counters::default(),
        }
    }

    /// The byte budget (`usize::MAX`: none).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// The threads a push wakes in block mode (set once, when the workers have started).
    pub fn set_waiters(&self, threads: Vec<Thread>) {
        let _ = self.waiters.set(threads);
    }

    /// Queues a job that holds no budgeted bytes; gives it back when its lane is full so the
    /// caller can answer `Overloaded` instead of losing it.
    pub fn push(&self, job: J, priority: bool) -> Result<(), J> {
        self.push_held(job, 0, priority).map_err(|(job, _)| job)
    }

    /// Queues a job that holds `bytes` until a worker pops it; gives it back, with the
    /// reason, when its lane is full or the bytes would not fit the budget. One atomic
    /// update, no lock, no allocation.
    pub fn push_held(&self, job: J, bytes: usize, priority: bool) -> Result<(), (J, Refusal)> {
        let held = &self.counters.queued_bytes;
        if bytes > 0
            && held
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                    now.checked_add(bytes).filter(|&total| total <= self.budget)
                })
                .is_err()
        {
            return Err((job, Refusal::OverBudget));
        }
        let q = if priority {
            &self.priority
        } else {
            &self.normal
        };
        if let Err((job, bytes)) = q.push((job, bytes)) {
            held.fetch_sub(bytes, Ordering::Relaxed);
            return Err((job, Refusal::Full));
        }
        self.counters.in_queue.fetch_add(1, Ordering::Relaxed);
        if self.mode.waits() {
            if let Some(ws) = self.waiters.get() {
                for w in ws {
                    w.unpark();
                }
            }
        }
        Ok(())
    }

    /// The next job, priority lane first.
    pub fn pop(&self) -> Option<J> {
        self.pop_lanes(true)
    }

    /// The next job: from the priority lane first when `priority_first`, else from the
    /// normal lane first. Its bytes leave the budget: the worker that has it is bounded by
    /// its own buffers, not by the queue.
    pub fn pop_lanes(&self, priority_first: bool) -> Option<J> {
        let (job, bytes) = if priority_first {
            self.priority.pop().or_else(|| self.normal.pop())
        } else {
            self.normal.pop().or_else(|| self.priority.pop())
        }?;
        self.counters.in_queue.fetch_sub(1, Ordering::Relaxed);
        if bytes > 0 {
            self.counters
                .queued_bytes
                .fetch_sub(bytes, Ordering::Relaxed);
        }
        Some(job)
    }

    pub fn depth(&self) -> usize {
        self.counters.in_queue.load(Ordering::Relaxed)
    }

    /// Bytes held by the queued jobs now.
    pub fn queued_bytes(&self) -> usize {
        self.counters.queued_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    #[test]
    fn push_wakes_a_parked_worker_in_block_mode() {
        let queue = Arc::new(WorkQueue::<u32>::new(4, PollMode::Block));
        let (tx, rx) = std::sync::mpsc::channel();
        let q = queue.clone();
        let worker = thread::spawn(move || {
            tx.send(()).unwrap();
            let start = Instant::now();
            loop {
                if q.pop().is_some() {
                    return start.elapsed();
                }
                // Far longer than the test waits: only an unpark ends it early.
                thread::park_timeout(Duration::from_secs(30));
            }
        });
        queue.set_waiters(vec![worker.thread().clone()]);
        rx.recv().unwrap();
        thread::sleep(Duration::from_millis(100));
        assert!(queue.push(7, false).is_ok());
        let waited = worker.join().unwrap();
        assert!(waited < Duration::from_secs(10), "woke after {waited:?}");
    }

    #[test]
    fn priority_lane_first_and_full_gives_back() {
        let q = WorkQueue::<u32>::new(1, PollMode::Busy);
        assert!(q.push(1, false).is_ok());
        assert_eq!(q.push(2, false), Err(2));
        assert!(q.push(3, true).is_ok());
        assert_eq!(q.depth(), 2);
        assert_eq!(q.pop_lanes(false), Some(1));
        assert_eq!(q.pop(), Some(3));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn the_byte_budget_refuses_what_would_not_fit_and_frees_on_pop() {
        let q = WorkQueue::<u32>::with_budget(8, PollMode::Busy, 1000);
        assert!(q.push_held(1, 600, false).is_ok());
        assert_eq!(q.push_held(2, 401, true), Err((2, Refusal::OverBudget)));
        assert!(q.push_held(3, 400, true).is_ok());
        assert_eq!(q.queued_bytes(), 1000);
        assert_eq!(q.push_held(4, 1, false), Err((4, Refusal::OverBudget)));
        assert_eq!(q.pop(), Some(3));
        assert_eq!(q.queued_bytes(), 600);
        assert!(q.push_held(5, 400, false).is_ok());
        // A full lane gives the bytes back.
        let tiny = WorkQueue::<u32>::with_budget(1, PollMode::Busy, 1000);
        assert!(tiny.push_held(6, 10, false).is_ok());
        assert_eq!(tiny.push_held(7, 10, false), Err((7, Refusal::Full)));
        assert_eq!(tiny.queued_bytes(), 10);
        assert_eq!(tiny.pop(), Some(6));
        assert_eq!(tiny.queued_bytes(), 0);
        // Bytes-free pushes never meet the budget.
        assert!(q.push(8, false).is_ok());
    }
}

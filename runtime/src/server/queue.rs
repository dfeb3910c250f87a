//! The work queue between a receive loop and its workers: two bounded lock-free lanes.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::thread::Thread;

use crossbeam_queue::ArrayQueue;

use crate::contract::{Counters, PollMode};

/// Two bounded lock-free queues: priority first, then normal.
pub struct WorkQueue<J> {
    priority: ArrayQueue<J>,
    normal: ArrayQueue<J>,
    waiters: OnceLock<Vec<Thread>>,
    mode: PollMode,
    pub counters: Counters,
}

impl<J> WorkQueue<J> {
    pub fn new(depth: usize, mode: PollMode) -> Self {
        WorkQueue {
            priority: ArrayQueue::new(depth.max(1)),
            normal: ArrayQueue::new(depth.max(1)),
            waiters: OnceLock::new(),
            mode,
            counters: Counters::default(),
        }
    }

    /// The threads a push wakes in block mode (set once, when the workers have started).
    pub fn set_waiters(&self, threads: Vec<Thread>) {
        let _ = self.waiters.set(threads);
    }

    /// Queues a job; gives it back when the queue is full so the caller can answer
    /// `Overloaded` instead of losing it.
    pub fn push(&self, job: J, priority: bool) -> Result<(), J> {
        let q = if priority {
            &self.priority
        } else {
            &self.normal
        };
        q.push(job)?;
        self.counters.in_queue.fetch_add(1, Ordering::Relaxed);
        if self.mode == PollMode::Block {
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
    /// normal lane first.
    pub fn pop_lanes(&self, priority_first: bool) -> Option<J> {
        let job = if priority_first {
            self.priority.pop().or_else(|| self.normal.pop())
        } else {
            self.normal.pop().or_else(|| self.priority.pop())
        }?;
        self.counters.in_queue.fetch_sub(1, Ordering::Relaxed);
        Some(job)
    }

    pub fn depth(&self) -> usize {
        self.counters.in_queue.load(Ordering::Relaxed)
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
}

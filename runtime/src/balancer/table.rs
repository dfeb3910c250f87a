//! The balancer's requests between admission and answer: a fixed table of entries (allocated
//! once), a free list and a FIFO of requests waiting for a backend connection. Each entry
//! keeps the client's envelope and a shared (refcounted, not copied) reference to the
//! request, so that the balancer itself can answer it (`Timeout`, `Unavailable`) or send it
//! again to another backend when the one it was on is lost.
//!
//! An entry is named on the wire to the backend by a ticket: its index and a generation that
//! changes every time the entry is reused, so a late reply for an entry already answered is
//! recognised and dropped, never delivered to the wrong client.

use std::collections::VecDeque;
use std::time::Instant;

use hacserve_ffi::zmq::Message;

use crate::transport::zmq::envelope::Envelope;

/// Bytes of the ticket frame put ahead of each request sent to a backend.
pub const TICKET_LEN: usize = 8;

/// Where an admitted request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Free,
    /// In the waiting FIFO (no connection could take it yet).
    Waiting,
    /// Sent on connection `.0`.
    Sent(usize),
}

pub struct Entry {
    pub generation: u32,
    pub place: Place,
    pub envelope: Envelope,
    pub body: Message,
    pub client: u32,
    pub request: u64,
    pub deadline: Instant,
    /// Already sent again after its connection was lost (sent once more at most).
    pub resent: bool,
}

pub struct RequestTable {
    entries: Vec<Entry>,
    free: Vec<u32>,
    waiting: VecDeque<u32>,
}

impl RequestTable {
    /// Room for `capacity` requests admitted at once (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, u32::MAX as usize);
        let now = Instant::now();
        let entries = (0..capacity)
            .map(|_| Entry {
                generation: 0,
                place: Place::Free,
                envelope: Envelope::new(),
                body: Message::new(),
                client: 0,
                request: 0,
                deadline: now,
                resent: false,
            })
            .collect();
        RequestTable {
            entries,
            // Popped from the end: entry 0 first.
            free: (0..capacity as u32).rev().collect(),
            waiting: VecDeque::with_capacity(capacity),
        }
    }

    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Requests admitted and not yet answered.
    pub fn in_use(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Takes a free entry for a request (its envelope and body are swapped in, leaving the
    /// caller's empty); None when the table is full.
    pub fn admit(
        &mut self,
        envelope: &mut Envelope,
        body: &mut Message,
        client: u32,
        request: u64,
        deadline: Instant,
    ) -> Option<usize> {
        let i = self.free.pop()? as usize;
        let e = &mut self.entries[i];
        std::mem::swap(&mut e.envelope, envelope);
        e.body = body.take();
        e.client = client;
        e.request = request;
        e.deadline = deadline;
        e.resent = false;
        e.place = Place::Waiting;
        Some(i)
    }

    pub fn entry(&self, i: usize) -> &Entry {
        &self.entries[i]
    }

    pub fn entry_mut(&mut self, i: usize) -> &mut Entry {
        &mut self.entries[i]
    }

    /// The ticket naming entry `i` in its current use.
    pub fn ticket(&self, i: usize) -> [u8; TICKET_LEN] {
        let mut t = [0u8; TICKET_LEN];
        t[..4].copy_from_slice(&(i as u32).to_le_bytes());
        t[4..].copy_from_slice(&self.entries[i].generation.to_le_bytes());
        t
    }

    /// The entry a reply's ticket names, if it is still sent on connection `conn` (None: a
    /// late or foreign reply).
    pub fn resolve(&self, ticket: &[u8], conn: usize) -> Option<usize> {
        let t: [u8; TICKET_LEN] = ticket.try_into().ok()?;
        let i = u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as usize;
        let generation = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        let e = self.entries.get(i)?;
        (e.generation == generation && e.place == Place::Sent(conn)).then_some(i)
    }

    /// Ends entry `i`'s use: it becomes free and its ticket stale. Its envelope stays with
    /// the entry until reuse (the caller sends from it first); the request reference is
    /// released now.
    pub fn release(&mut self, i: usize) {
        let e = &mut self.entries[i];
        debug_assert_ne!(e.place, Place::Free);
        e.place = Place::Free;
        e.generation = e.generation.wrapping_add(1);
        e.body = Message::new();
        self.free.push(i as u32);
    }

    pub fn push_waiting(&mut self, i: usize) {
        self.entries[i].place = Place::Waiting;
        self.waiting.push_back(i as u32);
    }

    pub fn push_waiting_front(&mut self, i: usize) {
        self.entries[i].place = Place::Waiting;
        self.waiting.push_front(i as u32);
    }

    /// The oldest waiting request, removed from the FIFO (it stays `Waiting` until placed).
    pub fn pop_waiting(&mut self) -> Option<usize> {
        self.waiting.pop_front().map(|i| i as usize)
    }

    /// Entries sent on connection `conn`.
    pub fn sent_on(&self, conn: usize) -> impl Iterator<Item = usize> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(move |(_, e)| e.place == Place::Sent(conn))
            .map(|(i, _)| i)
    }

    /// Entries (sent or waiting) whose deadline is at or before `now`.
    pub fn expired(&self, now: Instant) -> impl Iterator<Item = usize> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(move |(_, e)| e.place != Place::Free && e.deadline <= now)
            .map(|(i, _)| i)
    }

    /// The earliest deadline of an entry in use, if any.
    pub fn earliest_deadline(&self) -> Option<Instant> {
        self.entries
            .iter()
            .filter(|e| e.place != Place::Free)
            .map(|e| e.deadline)
            .min()
    }

    /// Removes entry `i` from the waiting FIFO (an expired waiting request).
    pub fn unwait(&mut self, i: usize) {
        if let Some(pos) = self.waiting.iter().position(|&w| w as usize == i) {
            self.waiting.remove(pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn admit(t: &mut RequestTable, request: u64, deadline: Instant) -> Option<usize> {
        let mut env = Envelope::new();
        let mut body = Message::from_slice(b"hello").unwrap();
        t.admit(&mut env, &mut body, 7, request, deadline)
    }

    #[test]
    fn tickets_go_stale_when_an_entry_is_reused() {
        let now = Instant::now();
        let mut t = RequestTable::new(2);
        let a = admit(&mut t, 1, now).unwrap();
        let b = admit(&mut t, 2, now).unwrap();
        assert_ne!(a, b);
        assert!(
            admit(&mut t, 3, now).is_none(),
            "a full table admits nothing"
        );
        t.entry_mut(a).place = Place::Sent(0);
        let ticket = t.ticket(a);
        assert_eq!(t.resolve(&ticket, 0), Some(a));
        assert_eq!(t.resolve(&ticket, 1), None, "sent on another connection");
        assert_eq!(t.entry(a).body.as_slice(), b"hello");
        t.release(a);
        assert_eq!(t.resolve(&ticket, 0), None, "answered already");
        let again = admit(&mut t, 4, now).unwrap();
        assert_eq!(again, a);
        t.entry_mut(again).place = Place::Sent(0);
        assert_eq!(
            t.resolve(&ticket, 0),
            None,
            "the old ticket names the old use"
        );
        assert_eq!(t.resolve(&t.ticket(again), 0), Some(again));
        assert_eq!(t.resolve(b"short", 0), None);
        assert_eq!(t.resolve(&[0xff; TICKET_LEN], 0), None);
    }

    #[test]
    fn waiting_is_fifo_and_expiry_finds_old_entries() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut t = RequestTable::new(4);
        let a = admit(&mut t, 1, now).unwrap();
        let b = admit(&mut t, 2, later).unwrap();
        let c = admit(&mut t, 3, now).unwrap();
        for i in [a, b, c] {
            t.push_waiting(i);
        }
        assert_eq!(t.pop_waiting(), Some(a));
        t.entry_mut(a).place = Place::Sent(1);
        assert_eq!(t.sent_on(1).collect::<Vec<_>>(), vec![a]);
        let expired: Vec<_> = t.expired(now).collect();
        assert_eq!(expired, vec![a, c]);
        assert_eq!(t.earliest_deadline(), Some(now));
        t.unwait(c);
        t.release(c);
        assert_eq!(t.pop_waiting(), Some(b));
        assert_eq!(t.pop_waiting(), None);
        assert_eq!(t.in_use(), 2);
    }
}

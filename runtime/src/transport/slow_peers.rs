//! Replies dropped because their peer stopped reading. A ROUTER queues at most its send
//! high-water mark of replies per peer; past that a non-blocking send fails with EAGAIN and
//! the reply is dropped here, counted against that peer, instead of blocking the loop that
//! serves every other client. Counted per peer so an operator can tell one flooding client
//! from a general overload.

use std::collections::HashMap;

use hacserve_ffi::zmq::ZmqError;

use crate::contract::TransportError;
use crate::protocol::Header;

/// Peers tracked by name; drops of any further peers are counted together (a flood of
/// fresh connections cannot grow this map without bound).
const MAX_TRACKED_PEERS: usize = 1024;
/// After the first drop of a peer (always logged), one line per this many more.
const LOG_EVERY: u64 = 10_000;

/// Per-peer counts of replies dropped because the peer's queue was full.
#[derive(Debug, Default)]
pub struct SlowPeers {
    /// Replies a peer may have queued (the socket's send high-water mark), for the log.
    bound: usize,
    per_peer: HashMap<Vec<u8>, PeerDrops>,
    untracked: u64,
    total: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct PeerDrops {
    dropped: u64,
    /// The client id of the last dropped reply (for the log; peers are routing ids).
    client_id: u32,
}

impl SlowPeers {
    /// For a socket that queues at most `bound` replies per peer.
    pub fn new(bound: usize) -> Self {
        SlowPeers {
            bound,
            ..Self::default()
        }
    }

    /// Turns a failed non-blocking send of a reply (whose header bytes are `reply_head`) to
    /// `peer` into its typed error: a full queue (EAGAIN) is a peer not reading, recorded
    /// against it; anything else (the peer is gone) is returned as it is.
    pub fn failed_send(&mut self, e: ZmqError, peer: &[u8], reply_head: &[u8]) -> TransportError {
        if e.would_block() {
            let (client, _) = Header::salvage_ids(reply_head);
            self.record(peer, client);
            return TransportError::PeerNotReading;
        }
        e.into()
    }

    /// Counts one reply to `peer` (its routing id) dropped; logs the first and every
    /// [`LOG_EVERY`]th. Returns the peer's count so far (0 for an untracked peer).
    fn record(&mut self, peer: &[u8], client_id: u32) -> u64 {
        let bound = self.bound;
        self.total += 1;
        if !self.per_peer.contains_key(peer) {
            if self.per_peer.len() >= MAX_TRACKED_PEERS {
                self.untracked += 1;
                if self.untracked == 1 || self.untracked % LOG_EVERY == 0 {
                    log::warn!(
                        "peer {} (client {client_id}) is not reading its replies: {} dropped among untracked peers",
                        hex(peer),
                        self.untracked
                    );
                }
                return 0;
            }
            self.per_peer.insert(peer.to_vec(), PeerDrops::default());
        }
        let Some(entry) = self.per_peer.get_mut(peer) else {
            return 0;
        };
        entry.dropped += 1;
        entry.client_id = client_id;
        if entry.dropped == 1 {
            log::warn!(
                "peer {} (client {client_id}) is not reading its replies: {bound} are queued for it, further replies are dropped",
                hex(peer)
            );
        } else if entry.dropped % LOG_EVERY == 0 {
            log::warn!(
                "peer {} (client {client_id}): {} replies dropped so far",
                hex(peer),
                entry.dropped
            );
        }
        entry.dropped
    }

    /// Replies dropped over all peers.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// "peer 00800041a7 (client 7): 148000; ..." worst first, at most `limit` peers named;
    /// None when nothing was dropped.
    pub fn summary(&self, limit: usize) -> Option<String> {
        if self.total == 0 {
            return None;
        }
        let mut peers: Vec<(&Vec<u8>, &PeerDrops)> = self.per_peer.iter().collect();
        peers.sort_by(|a, b| b.1.dropped.cmp(&a.1.dropped).then(a.0.cmp(b.0)));
        let mut parts: Vec<String> = peers
            .iter()
            .take(limit)
            .map(|(id, d)| format!("peer {} (client {}): {}", hex(id), d.client_id, d.dropped))
            .collect();
        if peers.len() > limit {
            let rest: u64 = peers[limit..].iter().map(|(_, d)| d.dropped).sum();
            parts.push(format!("{} more peers: {rest}", peers.len() - limit));
        }
        if self.untracked > 0 {
            parts.push(format!("untracked peers: {}", self.untracked));
        }
        Some(parts.join("; "))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_peer_and_bounds_the_map() {
        let mut s = SlowPeers::new(8);
        assert_eq!(s.summary(4), None);
        assert_eq!(s.record(b"\x00a", 1), 1);
        assert_eq!(s.record(b"\x00a", 1), 2);
        assert_eq!(s.record(b"\x00b", 2), 1);
        assert_eq!(s.total(), 3);
        assert_eq!(
            s.summary(4).unwrap(),
            "peer 0061 (client 1): 2; peer 0062 (client 2): 1"
        );
        assert_eq!(
            s.summary(1).unwrap(),
            "peer 0061 (client 1): 2; 1 more peers: 1"
        );
        for i in 0..(MAX_TRACKED_PEERS as u32 + 10) {
            s.record(&i.to_le_bytes(), i);
        }
        assert_eq!(s.per_peer.len(), MAX_TRACKED_PEERS);
        assert_eq!(s.total(), 3 + MAX_TRACKED_PEERS as u64 + 10);
        assert!(s.summary(2).unwrap().contains("untracked peers: 12"));
    }
}

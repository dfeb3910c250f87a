//! zmq_balancer: ZeroMQ clients in, several zmq_server backends out, least-outstanding-
//! requests routing. Routing frames pass through unchanged, so every reply reaches the client
//! that sent the request (the backend echoes the envelope; see `transport::zmq`).

use std::time::{Duration, Instant};

use hacserve_ffi::signal;
use hacserve_ffi::zmq::{Context, Message, PollSet, PollTarget, Socket, SocketType};

use crate::contract::{Backoff, PollMode, TransportError};
use crate::protocol::{encode_error, header_bytes, ErrorCode, Header, Task, RESPONSE_BODY_LEN};
use crate::transport::slow_peers::SlowPeers;
use crate::transport::zmq::envelope::{Envelope, Received};
use crate::transport::zmq::{hard_message_limit, DEFAULT_REPLY_HWM};

/// The longest zmq_poll while idle in block mode (it returns on the first message).
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Replies from the backends waiting to be forwarded (per connection).
const BACKEND_HWM: i32 = 100_000;
/// How long a request may wait for any backend connection to come up before `Overloaded`.
const NO_BACKEND_GRACE: Duration = Duration::from_secs(2);

/// Per-backend request counts, for the share each backend got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendShare {
    pub address: String,
    pub forwarded: u64,
    pub answered: u64,
}

pub struct Balancer {
    frontend: Socket,
    /// One DEALER per (backend, connection); `backend_of` and `outstanding` run parallel.
    sockets: Vec<Socket>,
    backend_of: Vec<usize>,
    outstanding: Vec<u64>,
    shares: Vec<BackendShare>,
    endpoint: String,
    slow_peers: SlowPeers,
}

/// Index of the connection with the fewest outstanding requests; ties go to the first at or
/// after `start`, so equal loads rotate instead of piling on connection 0.
pub fn pick_least_outstanding(outstanding: &[u64], start: usize) -> Option<usize> {
    let n = outstanding.len();
    (0..n)
        .map(|k| (start + k) % n)
        .min_by_key(|&i| outstanding[i])
}

impl Balancer {
    /// Binds the frontend on `local` ("tcp://0.0.0.0:5555") and opens `connections` DEALERs to
    /// each backend address ("host:port"). At most `reply_hwm` replies wait per client; the
    /// rest are dropped and counted (a client that does not read must not stall the others).
    /// A frame far above `max_payload` (from a client, or a reply from a backend) drops the
    /// connection that sent it instead of being buffered whole.
    pub fn new(
        ctx: &Context,
        local: &str,
        backends: &[String],
        connections: usize,
        reply_hwm: usize,
        max_payload: usize,
    ) -> Result<Self, TransportError> {
        let frontend = ctx.socket(SocketType::Router)?;
        frontend.set_router_mandatory(true)?;
        let reply_hwm = reply_hwm.clamp(1, i32::MAX as usize);
        frontend.set_sndhwm(reply_hwm as i32)?;
        frontend.set_rcvhwm(DEFAULT_REPLY_HWM as i32)?;
        frontend.set_max_msg_size(hard_message_limit(max_payload))?;
        frontend.bind(local)?;
        let endpoint = frontend.last_endpoint()?;
        let mut sockets = Vec::new();
        let mut backend_of = Vec::new();
        for (b, addr) in backends.iter().enumerate() {
            for _ in 0..connections.max(1) {
                let s = ctx.socket(SocketType::Dealer)?;
                s.set_hwm(BACKEND_HWM)?;
                // An echo's reply is the payload plus the response body.
                s.set_max_msg_size(hard_message_limit(max_payload + RESPONSE_BODY_LEN))?;
                // Only route to connections that are up, so a dead backend is skipped.
                s.set_immediate(true)?;
                s.connect(&format!("tcp://{addr}"))?;
                sockets.push(s);
                backend_of.push(b);
            }
        }
        Ok(Balancer {
            frontend,
            outstanding: vec![0; sockets.len()],
            sockets,
            backend_of,
            shares: backends
                .iter()
                .map(|a| BackendShare {
                    address: a.clone(),
                    ..Default::default()
                })
                .collect(),
            endpoint,
            slow_peers: SlowPeers::new(reply_hwm),
        })
    }

    /// Replies dropped per client that was not reading them; None when there were none.
    pub fn slow_peer_summary(&self) -> Option<String> {
        self.slow_peers.summary(8)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Forwards until a stop is requested; prints the backends' shares every `monitor`.
    pub fn run(
        &mut self,
        mode: PollMode,
        monitor: Duration,
    ) -> Result<Vec<BackendShare>, TransportError> {
        let Balancer {
            frontend,
            sockets,
            backend_of,
            outstanding,
            shares,
            slow_peers,
            ..
        } = self;
        let mut envelope = Envelope::new();
        let mut body = Message::new();
        let mut error_reply = Vec::with_capacity(512);
        let mut candidates = vec![0u64; sockets.len()];
        let mut next = 0usize;
        let mut last_report = Instant::now();
        let targets: Vec<PollTarget> = std::iter::once(PollTarget::Socket(&*frontend))
            .chain(sockets.iter().map(PollTarget::Socket))
            .collect();
        let mut poll = PollSet::new(&targets);
        // zmq_poll wakes on the first message: block at once when idle, never while busy.
        let mut idle = Backoff::new(mode, 0, IDLE_POLL);
        let mut progress = true;
        while !signal::stop_requested() {
            let timeout = idle.round(progress).as_millis() as i64;
            progress = false;
            match poll.poll(timeout) {
                Ok(_) => {}
                Err(e) if e.interrupted() => continue,
                Err(e) => return Err(e.into()),
            }
            for (i, socket) in sockets.iter().enumerate() {
                if !poll.readable(i + 1) {
                    continue;
                }
                while recv(socket, &mut envelope, &mut body)? {
                    progress = true;
                    outstanding[i] = outstanding[i].saturating_sub(1);
                    shares[backend_of[i]].answered += 1;
                    let head = header_bytes(body.as_slice());
                    if let Err(e) = envelope.send_msg(frontend, &mut body) {
                        match slow_peers.failed_send(e, envelope.peer(), &head) {
                            TransportError::PeerNotReading => {}
                            e => log::warn!("reply could not be delivered to its client: {e}"),
                        }
                    }
                }
            }
            if poll.readable(0) {
                while recv(frontend, &mut envelope, &mut body)? {
                    progress = true;
                    let mut sent = false;
                    // A backend whose connection is not up yet (start-up, reconnect) refuses
                    // the send: wait a little for one before answering Overloaded.
                    let deadline = Instant::now() + NO_BACKEND_GRACE;
                    loop {
                        candidates.copy_from_slice(outstanding);
                        // Try connections from least to most loaded; a full or down one is skipped.
                        for _ in 0..sockets.len() {
                            let Some(i) = pick_least_outstanding(&candidates, next) else {
                                break;
                            };
                            // Refused (full or down) at the first frame, nothing is
                            // consumed: the next connection gets the same frames.
                            match envelope.send_msg(&sockets[i], &mut body) {
                                Ok(()) => {
                                    outstanding[i] += 1;
                                    shares[backend_of[i]].forwarded += 1;
                                    next = (i + 1) % sockets.len();
                                    sent = true;
                                    break;
                                }
                                Err(e) if e.would_block() => candidates[i] = u64::MAX,
                                Err(e) => return Err(e.into()),
                            }
                        }
                        if sent || Instant::now() >= deadline {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    if !sent {
                        let (client, request) = Header::salvage_ids(body.as_slice());
                        encode_error(
                            &mut error_reply,
                            client,
                            request,
                            Task::Echo,
                            ErrorCode::Overloaded,
                            "no backend connection is available",
                        );
                        log::warn!("no backend available for client {client} request {request}");
                        if let Err(e) = envelope.send(frontend, &error_reply) {
                            log::warn!("error reply could not be delivered: {e}");
                        }
                    }
                }
            }
            if !monitor.is_zero() && last_report.elapsed() >= monitor {
                last_report = Instant::now();
                println!("[balancer] {}", format_shares(shares));
            }
        }
        Ok(shares.clone())
    }
}

pub fn format_shares(shares: &[BackendShare]) -> String {
    let total: u64 = shares.iter().map(|s| s.forwarded).sum::<u64>().max(1);
    shares
        .iter()
        .map(|s| {
            format!(
                "{}: {} forwarded ({:.1}%), {} answered",
                s.address,
                s.forwarded,
                100.0 * s.forwarded as f64 / total as f64,
                s.answered
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One whole message into `envelope` and `body`; false when nothing is waiting. Messages
/// outside the envelope bounds are dropped by the reader (logged there).
fn recv(s: &Socket, envelope: &mut Envelope, body: &mut Message) -> Result<bool, TransportError> {
    loop {
        match envelope.recv(s, body)? {
            Received::Message => return Ok(true),
            Received::Nothing => return Ok(false),
            Received::Dropped => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_outstanding_with_rotating_ties() {
        assert_eq!(pick_least_outstanding(&[], 0), None);
        assert_eq!(pick_least_outstanding(&[3, 1, 2], 0), Some(1));
        assert_eq!(pick_least_outstanding(&[0, 0, 0], 2), Some(2));
        assert_eq!(pick_least_outstanding(&[0, 0, 0], 4), Some(1));
        assert_eq!(pick_least_outstanding(&[5, u64::MAX, 5], 1), Some(2));
        // Equal load spreads evenly over many picks.
        let mut load = [0u64; 4];
        let mut counts = [0; 4];
        let mut next = 0;
        for _ in 0..400 {
            let i = pick_least_outstanding(&load, next).unwrap();
            counts[i] += 1;
            load[i] += 1;
            next = (i + 1) % 4;
        }
        assert_eq!(counts, [100; 4]);
    }
}

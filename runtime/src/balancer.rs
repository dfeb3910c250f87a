//! zmq_balancer: ZeroMQ clients in, several zmq_server backends out, least-outstanding-
//! requests routing. Routing frames pass through unchanged, so every reply reaches the client
//! that sent the request (the backend echoes the envelope; see `transport::zmq`).

use std::time::{Duration, Instant};

use hacserve_ffi::signal;
use hacserve_ffi::zmq::{
    Context, Message, PollSet, PollTarget, Socket, SocketType, DONTWAIT, SNDMORE,
};

use crate::protocol::{encode_error, ErrorCode, Header, Task};
use crate::server::PollMode;
use crate::transport::slow_peers::SlowPeers;
use crate::transport::TransportError;

const MAX_FRAMES: usize = 8;
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
    reply_hwm: usize,
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
    pub fn new(
        ctx: &Context,
        local: &str,
        backends: &[String],
        connections: usize,
        reply_hwm: usize,
    ) -> Result<Self, TransportError> {
        let frontend = ctx.socket(SocketType::Router)?;
        frontend.set_router_mandatory(true)?;
        let reply_hwm = reply_hwm.clamp(1, i32::MAX as usize);
        frontend.set_sndhwm(reply_hwm as i32)?;
        frontend.set_rcvhwm(crate::transport::zmq::DEFAULT_REPLY_HWM as i32)?;
        frontend.bind(local)?;
        let endpoint = frontend.last_endpoint()?;
        let mut sockets = Vec::new();
        let mut backend_of = Vec::new();
        for (b, addr) in backends.iter().enumerate() {
            for _ in 0..connections.max(1) {
                let s = ctx.socket(SocketType::Dealer)?;
                s.set_hwm(100_000)?;
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
            reply_hwm,
            slow_peers: SlowPeers::new(),
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
            reply_hwm,
            slow_peers,
            ..
        } = self;
        let mut frames: Vec<Message> = (0..MAX_FRAMES).map(|_| Message::new()).collect();
        let mut error_reply = Vec::with_capacity(512);
        let mut candidates = vec![0u64; sockets.len()];
        let mut next = 0usize;
        let mut last_report = Instant::now();
        let targets: Vec<PollTarget> = std::iter::once(PollTarget::Socket(&*frontend))
            .chain(sockets.iter().map(PollTarget::Socket))
            .collect();
        let mut poll = PollSet::new(&targets);
        while !signal::stop_requested() {
            let timeout = if mode == PollMode::Busy { 0 } else { 100 };
            match poll.poll(timeout) {
                Ok(_) => {}
                Err(e) if e.interrupted() => continue,
                Err(e) => return Err(e.into()),
            }
            for (i, socket) in sockets.iter().enumerate() {
                if !poll.readable(i + 1) {
                    continue;
                }
                while let Some(n) = recv_frames(socket, &mut frames)? {
                    outstanding[i] = outstanding[i].saturating_sub(1);
                    shares[backend_of[i]].answered += 1;
                    if let Err(e) = send_frames(frontend, &mut frames[..n]) {
                        if e.would_block() {
                            let (client, _) = Header::salvage_ids(frames[n - 1].as_slice());
                            slow_peers.record(frames[0].as_slice(), client, *reply_hwm);
                        } else {
                            log::warn!("reply could not be delivered to its client: {e}");
                        }
                    }
                }
            }
            if poll.readable(0) {
                while let Some(n) = recv_frames(frontend, &mut frames)? {
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
                            match send_frames(&sockets[i], &mut frames[..n]) {
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
                        let (client, request) = Header::salvage_ids(frames[n - 1].as_slice());
                        encode_error(
                            &mut error_reply,
                            client,
                            request,
                            Task::Echo,
                            ErrorCode::Overloaded,
                            "no backend connection is available",
                        );
                        log::warn!("no backend available for client {client} request {request}");
                        frames[n - 1] = Message::from_slice(&error_reply)?;
                        if let Err(e) = send_frames(frontend, &mut frames[..n]) {
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

/// Receives one multipart message into `frames`; None if nothing is waiting. Messages with
/// more frames than fit are dropped with a log line (they cannot be routed back).
fn recv_frames(s: &Socket, frames: &mut [Message]) -> Result<Option<usize>, TransportError> {
    let mut more = match s.recv_msg(&mut frames[0], DONTWAIT) {
        Ok(m) => m,
        Err(e) if e.would_block() || e.interrupted() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut n = 1;
    while more {
        if n == frames.len() {
            s.drain_more(&mut frames[n - 1])?;
            log::error!("message with more than {MAX_FRAMES} frames dropped");
            return Ok(None);
        }
        more = s.recv_msg(&mut frames[n], 0)?;
        n += 1;
    }
    Ok(Some(n))
}

fn send_frames(s: &Socket, frames: &mut [Message]) -> Result<(), hacserve_ffi::zmq::ZmqError> {
    let last = frames.len() - 1;
    for (i, f) in frames.iter_mut().enumerate() {
        let flags = if i < last { SNDMORE } else { 0 } | if i == 0 { DONTWAIT } else { 0 };
        s.send_msg(f, flags)?;
    }
    Ok(())
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

//! One DEALER connection from the balancer to a backend, with its liveness.
//!
//! Liveness comes from libzmq itself: a socket monitor reports the connection coming up
//! (handshake done) and going down (TCP closed, or ZMTP heartbeats unanswered for
//! [`HEARTBEAT_TIMEOUT`]: a stopped process or a vanished host), and libzmq reconnects with
//! exponential backoff ([`RECONNECT_FIRST`] doubling up to [`RECONNECT_MAX`]). The balancer
//! marks the connection down on the event, answers or resends what was in flight on it, and
//! takes it back when the next handshake succeeds.

use hacserve_ffi::zmq::{
    Context, Message, MonitorEvent, Socket, SocketType, EVENT_CONNECTED, EVENT_DISCONNECTED,
    EVENT_HANDSHAKE_SUCCEEDED,
};

use crate::contract::TransportError;

/// Replies from a backend waiting to be forwarded, and requests waiting to be written to it.
const BACKEND_HWM: i32 = 100_000;
/// The first reconnection attempt after a loss, then doubling up to the maximum.
pub const RECONNECT_FIRST_MS: i32 = 100;
pub const RECONNECT_MAX_MS: i32 = 2_000;
/// A PING this often; a connection silent this long is closed.
pub const HEARTBEAT_IVL_MS: i32 = 500;
pub const HEARTBEAT_TIMEOUT_MS: i32 = 2_000;

/// What the monitor reported since the last look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Liveness {
    /// The connection closed at least once: whatever was sent on it before is lost, even
    /// if it is up again already.
    pub lost: bool,
    /// Its state after the last event (None: no event).
    pub up: Option<bool>,
}

/// Opens a DEALER to `tcp://<addr>` whose inbound frames may be up to `max_msg_size` bytes,
/// and the PAIR socket its monitor reports on. The connection counts as down until the
/// monitor says it is up.
pub fn open(
    ctx: &Context,
    addr: &str,
    max_msg_size: i64,
) -> Result<(Socket, Socket), TransportError> {
    let socket = ctx.socket(SocketType::Dealer)?;
    socket.set_hwm(BACKEND_HWM)?;
    socket.set_max_msg_size(max_msg_size)?;
    // Only queue to a connection that is up, so a send to a down one fails at once.
    socket.set_immediate(true)?;
    socket.set_reconnect_backoff(RECONNECT_FIRST_MS, RECONNECT_MAX_MS)?;
    socket.set_heartbeat(HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS)?;
    let monitor = ctx.monitor(
        &socket,
        EVENT_CONNECTED | EVENT_HANDSHAKE_SUCCEEDED | EVENT_DISCONNECTED,
    )?;
    socket.connect(&format!("tcp://{addr}"))?;
    Ok((socket, monitor))
}

/// The liveness events `monitor` reported since the last call.
pub fn liveness(monitor: &Socket, scratch: &mut Message) -> Result<Liveness, TransportError> {
    let mut seen = Liveness::default();
    while let Some(ev) = MonitorEvent::read(monitor, scratch)? {
        match ev.event {
            // Connected: writable once the handshake is done (a send before fails and is
            // tried again).
            EVENT_CONNECTED | EVENT_HANDSHAKE_SUCCEEDED => seen.up = Some(true),
            EVENT_DISCONNECTED => {
                seen.lost = true;
                seen.up = Some(false);
            }
            _ => {}
        }
    }
    Ok(seen)
}

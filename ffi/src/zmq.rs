//! A thin safe layer over the raw `zmq-sys` bindings (libzmq built from source, linked
//! statically). Only what hacserve uses: contexts, sockets, messages, poll.
//!
//! Threading follows libzmq's rules: a [`Context`] is shared, a [`Socket`] is used by one thread
//! at a time (it is `Send`, not `Sync`), a [`Message`] can move between threads.

use std::ffi::{c_int, c_void, CStr, CString};
use std::os::fd::RawFd;
use std::ptr;
use std::sync::Arc;

use thiserror::Error;
use zmq_sys as sys;

/// A libzmq call failed; `errno` is libzmq's error number.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("zmq {call}: {text} (errno {errno})")]
pub struct ZmqError {
    pub call: &'static str,
    pub errno: i32,
    pub text: String,
}

impl ZmqError {
    fn last(call: &'static str) -> Self {
        // SAFETY: zmq_errno reads thread-local errno; zmq_strerror returns a static C string.
        let errno = unsafe { sys::zmq_errno() };
        let text = unsafe { CStr::from_ptr(sys::zmq_strerror(errno)) }
            .to_string_lossy()
            .into_owned();
        ZmqError { call, errno, text }
    }

    /// True when a non-blocking call found nothing to do (EAGAIN).
    pub fn would_block(&self) -> bool {
        self.errno == libc::EAGAIN
    }

    /// True when the call was interrupted by a signal (EINTR).
    pub fn interrupted(&self) -> bool {
        self.errno == libc::EINTR
    }
}

pub type Result<T> = std::result::Result<T, ZmqError>;

fn check(call: &'static str, rc: c_int) -> Result<c_int> {
    if rc < 0 {
        Err(ZmqError::last(call))
    } else {
        Ok(rc)
    }
}

struct RawContext(*mut c_void);

// SAFETY: a libzmq context is thread-safe by design.
unsafe impl Send for RawContext {}
// SAFETY: as above; libzmq guards context state internally.
unsafe impl Sync for RawContext {}

impl Drop for RawContext {
    fn drop(&mut self) {
        // SAFETY: self.0 came from zmq_ctx_new and every socket holds an Arc to us, so all
        // sockets are closed by now and zmq_ctx_term will not block forever.
        unsafe { while sys::zmq_ctx_term(self.0) != 0 && sys::zmq_errno() == libc::EINTR {} }
    }
}

/// A libzmq context (its I/O threads). Cheap to clone.
#[derive(Clone)]
pub struct Context {
    raw: Arc<RawContext>,
}

impl Context {
    pub fn new() -> Result<Self> {
        // SAFETY: plain constructor; null means failure.
        let raw = unsafe { sys::zmq_ctx_new() };
        if raw.is_null() {
            return Err(ZmqError::last("zmq_ctx_new"));
        }
        Ok(Context {
            raw: Arc::new(RawContext(raw)),
        })
    }

    /// Sets the number of libzmq I/O threads (must be called before sockets are made).
    pub fn set_io_threads(&self, n: i32) -> Result<()> {
        // SAFETY: valid context pointer, known option.
        check("zmq_ctx_set", unsafe {
            sys::zmq_ctx_set(self.raw.0, sys::ZMQ_IO_THREADS as c_int, n)
        })
        .map(|_| ())
    }

    pub fn socket(&self, kind: SocketType) -> Result<Socket> {
        // SAFETY: valid context pointer; null means failure.
        let raw = unsafe { sys::zmq_socket(self.raw.0, kind as c_int) };
        if raw.is_null() {
            return Err(ZmqError::last("zmq_socket"));
        }
        let socket = Socket {
            raw,
            _ctx: self.raw.clone(),
        };
        // Never block process exit on unsent messages.
        socket.set_int(sys::ZMQ_LINGER as c_int, 0)?;
        Ok(socket)
    }

    /// Starts a monitor on `socket` for `events` (a mask of `EVENT_*`) on an inproc endpoint
    /// of its own and returns the PAIR socket its events arrive on (read them with
    /// [`MonitorEvent::read`]). Call it before `socket` connects, so no event is missed.
    pub fn monitor(&self, socket: &Socket, events: u32) -> Result<Socket> {
        static MONITORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = MONITORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let endpoint = format!("inproc://hacserve-monitor-{n}");
        socket.monitor(&endpoint, events)?;
        let pair = self.socket(SocketType::Pair)?;
        pair.connect(&endpoint)?;
        Ok(pair)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum SocketType {
    Pair = sys::ZMQ_PAIR as i32,
    Req = sys::ZMQ_REQ as i32,
    Rep = sys::ZMQ_REP as i32,
    Dealer = sys::ZMQ_DEALER as i32,
    Router = sys::ZMQ_ROUTER as i32,
    Pull = sys::ZMQ_PULL as i32,
    Push = sys::ZMQ_PUSH as i32,
}

/// Send/receive flags.
pub const DONTWAIT: i32 = sys::ZMQ_DONTWAIT as i32;
pub const SNDMORE: i32 = sys::ZMQ_SNDMORE as i32;
/// Poll events.
pub const POLLIN: i16 = sys::ZMQ_POLLIN as i16;
/// Whether this libzmq was built with a capability ("curve", "ipc", "draft", ...).
pub fn has(capability: &str) -> bool {
    let Ok(c) = CString::new(capability) else {
        return false;
    };
    // SAFETY: c is a NUL-terminated string for the call; zmq_has only reads it.
    unsafe { sys::zmq_has(c.as_ptr()) != 0 }
}

/// Connection events a socket monitor reports ([`Socket::monitor`]).
pub const EVENT_CONNECTED: u32 = sys::ZMQ_EVENT_CONNECTED;
pub const EVENT_DISCONNECTED: u32 = sys::ZMQ_EVENT_DISCONNECTED;
pub const EVENT_HANDSHAKE_SUCCEEDED: u32 = sys::ZMQ_EVENT_HANDSHAKE_SUCCEEDED;

/// One event from a socket monitor: libzmq sends a 6-byte frame (u16 event, u32 value, host
/// byte order) and then the endpoint's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonitorEvent {
    pub event: u32,
    pub value: u32,
}

impl MonitorEvent {
    /// Reads one event from a PAIR socket connected to a monitor endpoint without waiting;
    /// None when none is waiting (or the frame is not an event, which libzmq never sends).
    pub fn read(pair: &Socket, scratch: &mut Message) -> Result<Option<MonitorEvent>> {
        let more = match pair.recv_msg(scratch, DONTWAIT) {
            Ok(more) => more,
            Err(e) if e.would_block() || e.interrupted() => return Ok(None),
            Err(e) => return Err(e),
        };
        let event = match scratch.as_slice() {
            [a, b, c, d, e, f] => Some(MonitorEvent {
                event: u16::from_ne_bytes([*a, *b]) as u32,
                value: u32::from_ne_bytes([*c, *d, *e, *f]),
            }),
            _ => None,
        };
        if more {
            pair.drain_more(scratch)?;
        }
        Ok(event)
    }
}

/// A libzmq socket, used by one thread at a time.
pub struct Socket {
    raw: *mut c_void,
    _ctx: Arc<RawContext>,
}

// SAFETY: libzmq sockets may migrate between threads with a full memory barrier in between,
// which moving a value to another thread provides; `Socket` is not `Sync`, so no concurrent use.
unsafe impl Send for Socket {}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: raw came from zmq_socket and is closed exactly once here.
        unsafe {
            sys::zmq_close(self.raw);
        }
    }
}

impl Socket {
    pub fn bind(&self, endpoint: &str) -> Result<()> {
        let c = endpoint_cstring(endpoint)?;
        // SAFETY: valid socket, NUL-terminated endpoint.
        check("zmq_bind", unsafe { sys::zmq_bind(self.raw, c.as_ptr()) }).map(|_| ())
    }

    pub fn connect(&self, endpoint: &str) -> Result<()> {
        let c = endpoint_cstring(endpoint)?;
        // SAFETY: valid socket, NUL-terminated endpoint.
        check("zmq_connect", unsafe {
            sys::zmq_connect(self.raw, c.as_ptr())
        })
        .map(|_| ())
    }

    fn set_int(&self, option: c_int, value: c_int) -> Result<()> {
        // SAFETY: value points to a live c_int of the size passed.
        check("zmq_setsockopt", unsafe {
            sys::zmq_setsockopt(
                self.raw,
                option,
                &value as *const c_int as *const c_void,
                std::mem::size_of::<c_int>(),
            )
        })
        .map(|_| ())
    }

    fn set_bytes(&self, option: c_int, value: &[u8]) -> Result<()> {
        // SAFETY: value is a live byte slice of the length passed.
        check("zmq_setsockopt", unsafe {
            sys::zmq_setsockopt(
                self.raw,
                option,
                value.as_ptr() as *const c_void,
                value.len(),
            )
        })
        .map(|_| ())
    }

    /// How long closing the socket may wait to deliver queued messages (ms, -1 = forever).
    pub fn set_linger(&self, ms: i32) -> Result<()> {
        self.set_int(sys::ZMQ_LINGER as c_int, ms)
    }

    /// Routing identity this socket announces to ROUTER peers.
    pub fn set_identity(&self, id: &[u8]) -> Result<()> {
        self.set_bytes(sys::ZMQ_ROUTING_ID as c_int, id)
    }
    /// Receive timeout in ms (-1 = forever).
    pub fn set_rcvtimeo(&self, ms: i32) -> Result<()> {
        self.set_int(sys::ZMQ_RCVTIMEO as c_int, ms)
    }
    /// Send timeout in ms (-1 = forever).
    pub fn set_sndtimeo(&self, ms: i32) -> Result<()> {
        self.set_int(sys::ZMQ_SNDTIMEO as c_int, ms)
    }
    /// High-water marks (messages queued per peer) for both directions.
    pub fn set_hwm(&self, n: i32) -> Result<()> {
        self.set_int(sys::ZMQ_SNDHWM as c_int, n)?;
        self.set_int(sys::ZMQ_RCVHWM as c_int, n)
    }
    /// Outbound high-water mark only: messages libzmq queues per peer before a send fails
    /// with EAGAIN (non-blocking) or blocks.
    pub fn set_sndhwm(&self, n: i32) -> Result<()> {
        self.set_int(sys::ZMQ_SNDHWM as c_int, n)
    }
    /// Inbound high-water mark only: messages libzmq reads ahead per peer before it stops
    /// reading that peer's connection (back-pressure on that peer alone).
    pub fn set_rcvhwm(&self, n: i32) -> Result<()> {
        self.set_int(sys::ZMQ_RCVHWM as c_int, n)
    }
    /// ROUTER: fail with EHOSTUNREACH instead of dropping a message to an unknown peer.
    pub fn set_router_mandatory(&self, on: bool) -> Result<()> {
        self.set_int(sys::ZMQ_ROUTER_MANDATORY as c_int, on as c_int)
    }
    /// Largest inbound message libzmq accepts before dropping the connection (-1 = no limit).
    pub fn set_max_msg_size(&self, bytes: i64) -> Result<()> {
        // SAFETY: ZMQ_MAXMSGSIZE takes an int64_t.
        check("zmq_setsockopt", unsafe {
            sys::zmq_setsockopt(
                self.raw,
                sys::ZMQ_MAXMSGSIZE as c_int,
                &bytes as *const i64 as *const c_void,
                std::mem::size_of::<i64>(),
            )
        })
        .map(|_| ())
    }
    /// TCP_NODELAY is libzmq's default; this keeps the kernel from batching small replies.
    pub fn set_immediate(&self, on: bool) -> Result<()> {
        self.set_int(sys::ZMQ_IMMEDIATE as c_int, on as c_int)
    }

    /// Reconnection backoff after a lost or refused connection: the first retry after
    /// `first_ms`, each later one twice as late, up to `max_ms` (libzmq does the retrying).
    pub fn set_reconnect_backoff(&self, first_ms: i32, max_ms: i32) -> Result<()> {
        self.set_int(sys::ZMQ_RECONNECT_IVL as c_int, first_ms)?;
        self.set_int(sys::ZMQ_RECONNECT_IVL_MAX as c_int, max_ms)
    }

    /// ZMTP heartbeats: a PING every `interval_ms`; a connection that answers nothing for
    /// `timeout_ms` is closed (a peer that is stopped or whose host vanished, which TCP alone
    /// notices only after minutes).
    pub fn set_heartbeat(&self, interval_ms: i32, timeout_ms: i32) -> Result<()> {
        self.set_int(sys::ZMQ_HEARTBEAT_IVL as c_int, interval_ms)?;
        self.set_int(sys::ZMQ_HEARTBEAT_TIMEOUT as c_int, timeout_ms)?;
        // The peer may drop us after the same time without traffic from us.
        self.set_int(sys::ZMQ_HEARTBEAT_TTL as c_int, timeout_ms)
    }

    /// Publishes this socket's connection events (`events`: a mask of `EVENT_*`) on an inproc
    /// PAIR endpoint; read them with a PAIR socket connected there and [`MonitorEvent::read`].
    pub fn monitor(&self, endpoint: &str, events: u32) -> Result<()> {
        let c = endpoint_cstring(endpoint)?;
        // SAFETY: self.raw is a live socket and c a NUL-terminated string for the call.
        check("zmq_socket_monitor", unsafe {
            sys::zmq_socket_monitor(self.raw, c.as_ptr(), events as c_int)
        })
        .map(|_| ())
    }

    /// The endpoint actually bound (resolves "tcp://127.0.0.1:*" to a port).
    pub fn last_endpoint(&self) -> Result<String> {
        let mut buf = [0u8; 256];
        let mut len = buf.len();
        // SAFETY: buf is writable for len bytes; libzmq writes a NUL-terminated string.
        check("zmq_getsockopt", unsafe {
            sys::zmq_getsockopt(
                self.raw,
                sys::ZMQ_LAST_ENDPOINT as c_int,
                buf.as_mut_ptr() as *mut c_void,
                &mut len,
            )
        })?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// Sends one frame copied from `data`.
    pub fn send(&self, data: &[u8], flags: i32) -> Result<()> {
        // SAFETY: data is a live slice; libzmq copies it before returning.
        check("zmq_send", unsafe {
            sys::zmq_send(self.raw, data.as_ptr() as *const c_void, data.len(), flags)
        })
        .map(|_| ())
    }

    /// Sends a message without copying; `msg` is left empty on success.
    pub fn send_msg(&self, msg: &mut Message, flags: i32) -> Result<()> {
        // SAFETY: msg.raw is an initialised zmq_msg_t; on success libzmq takes its content and
        // re-initialises it as empty, so our later zmq_msg_close is still correct.
        check("zmq_msg_send", unsafe {
            sys::zmq_msg_send(&mut msg.raw, self.raw, flags)
        })
        .map(|_| ())
    }

    /// Receives one frame into `msg` (replacing its content). Returns whether more frames follow.
    pub fn recv_msg(&self, msg: &mut Message, flags: i32) -> Result<bool> {
        // SAFETY: msg.raw is an initialised zmq_msg_t; libzmq releases its old content first.
        check("zmq_msg_recv", unsafe {
            sys::zmq_msg_recv(&mut msg.raw, self.raw, flags)
        })?;
        Ok(msg.more())
    }

    /// Receives one frame into `buf`; returns the frame's full length (which may exceed
    /// `buf.len()`, in which case the frame was truncated) and whether more frames follow.
    pub fn recv_into(&self, buf: &mut [u8], flags: i32) -> Result<(usize, bool)> {
        // SAFETY: buf is writable for buf.len() bytes.
        let n = check("zmq_recv", unsafe {
            sys::zmq_recv(self.raw, buf.as_mut_ptr() as *mut c_void, buf.len(), flags)
        })?;
        Ok((n as usize, self.rcvmore()?))
    }

    /// Discards the remaining frames of a multipart message.
    pub fn drain_more(&self, scratch: &mut Message) -> Result<()> {
        while self.rcvmore()? {
            self.recv_msg(scratch, 0)?;
        }
        Ok(())
    }

    fn rcvmore(&self) -> Result<bool> {
        let mut v: c_int = 0;
        let mut len = std::mem::size_of::<c_int>();
        // SAFETY: v is a live c_int and len its size.
        check("zmq_getsockopt", unsafe {
            sys::zmq_getsockopt(
                self.raw,
                sys::ZMQ_RCVMORE as c_int,
                &mut v as *mut c_int as *mut c_void,
                &mut len,
            )
        })?;
        Ok(v != 0)
    }
}

fn endpoint_cstring(endpoint: &str) -> Result<CString> {
    CString::new(endpoint).map_err(|_| ZmqError {
        call: "endpoint",
        errno: libc::EINVAL,
        text: format!("endpoint {endpoint:?} contains a NUL byte"),
    })
}

/// One message frame owned by libzmq (large frames are not copied on receive).
pub struct Message {
    raw: sys::zmq_msg_t,
}

// SAFETY: a zmq_msg_t holds no thread affinity; libzmq's content refcount is atomic, and the
// struct has no pointers into itself (small messages are stored inline and addressed relative
// to the struct), so moving it is sound.
unsafe impl Send for Message {}

impl Default for Message {
    fn default() -> Self {
        Self::new()
    }
}

impl Message {
    pub fn new() -> Self {
        let mut raw = sys::zmq_msg_t { __: [0; 64] };
        // SAFETY: zmq_msg_init cannot fail and initialises an empty message.
        unsafe {
            sys::zmq_msg_init(&mut raw);
        }
        Message { raw }
    }

    /// A message holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Result<Self> {
        let mut raw = sys::zmq_msg_t { __: [0; 64] };
        // SAFETY: init_size allocates `len` bytes which we then fill from a live slice.
        unsafe {
            check(
                "zmq_msg_init_size",
                sys::zmq_msg_init_size(&mut raw, data.len()),
            )?;
            if !data.is_empty() {
                ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    sys::zmq_msg_data(&mut raw) as *mut u8,
                    data.len(),
                );
            }
        }
        Ok(Message { raw })
    }

    /// A message of `len` bytes for the caller to fill (content unspecified until written).
    pub fn with_size(len: usize) -> Result<Self> {
        let mut raw = sys::zmq_msg_t { __: [0; 64] };
        // SAFETY: init_size allocates `len` bytes owned by the message.
        check("zmq_msg_init_size", unsafe {
            sys::zmq_msg_init_size(&mut raw, len)
        })?;
        Ok(Message { raw })
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len();
        if len == 0 {
            return &mut [];
        }
        // SAFETY: the message owns `len` bytes at zmq_msg_data; &mut self makes this the only
        // reference. Content shared through `share()` is refcounted, but writing to a message
        // after sharing it is not done anywhere in hacserve.
        unsafe {
            let p = sys::zmq_msg_data(&mut self.raw) as *mut u8;
            std::slice::from_raw_parts_mut(p, len)
        }
    }

    pub fn len(&self) -> usize {
        // SAFETY: raw is initialised.
        unsafe { sys::zmq_msg_size(&self.raw) }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        let len = self.len();
        if len == 0 {
            return &[];
        }
        // SAFETY: zmq_msg_data does not mutate despite its signature; the data stays valid and
        // unaliased-for-writes while we hold &self.
        unsafe {
            let p = sys::zmq_msg_data(&self.raw as *const _ as *mut sys::zmq_msg_t) as *const u8;
            std::slice::from_raw_parts(p, len)
        }
    }

    /// Moves the content of `self` into a new message, leaving `self` empty.
    pub fn take(&mut self) -> Message {
        let mut out = Message::new();
        // SAFETY: both are initialised; move cannot fail on valid messages.
        unsafe {
            sys::zmq_msg_move(&mut out.raw, &mut self.raw);
        }
        out
    }

    /// A second reference to the same content (refcounted, no byte copy for large frames).
    pub fn share(&mut self) -> Result<Message> {
        let mut out = Message::new();
        // SAFETY: both are initialised.
        check("zmq_msg_copy", unsafe {
            sys::zmq_msg_copy(&mut out.raw, &mut self.raw)
        })?;
        Ok(out)
    }

    fn more(&self) -> bool {
        // SAFETY: raw is initialised.
        unsafe { sys::zmq_msg_more(&self.raw) != 0 }
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        // SAFETY: raw is initialised and closed exactly once.
        unsafe {
            sys::zmq_msg_close(&mut self.raw);
        }
    }
}

/// What to wait on: a socket or a plain file descriptor (e.g. an eventfd).
pub enum PollTarget<'a> {
    Socket(&'a Socket),
    Fd(RawFd),
}

/// zmq_poll over `items`, whose sockets the caller keeps alive for the call; returns how
/// many are ready.
fn poll_items(items: &mut [sys::zmq_pollitem_t], timeout_ms: i64) -> Result<usize> {
    // SAFETY: `items` are initialised poll items (socket pointers the callers borrow for the
    // call, or plain fds), and zmq_poll writes only their revents, within the slice.
    let n = check("zmq_poll", unsafe {
        sys::zmq_poll(items.as_mut_ptr(), items.len() as c_int, timeout_ms as _)
    })?;
    Ok(n as usize)
}

/// A set of poll items built once and polled many times (no allocation per poll).
pub struct PollSet<'a> {
    items: Vec<sys::zmq_pollitem_t>,
    _targets: std::marker::PhantomData<&'a Socket>,
}

impl<'a> PollSet<'a> {
    pub fn new(targets: &[PollTarget<'a>]) -> Self {
        let items = targets
            .iter()
            .map(|t| {
                let (socket, fd) = match t {
                    PollTarget::Socket(s) => (s.raw, 0),
                    PollTarget::Fd(fd) => (ptr::null_mut(), *fd),
                };
                sys::zmq_pollitem_t {
                    socket,
                    fd,
                    events: POLLIN,
                    revents: 0,
                }
            })
            .collect();
        PollSet {
            items,
            _targets: std::marker::PhantomData,
        }
    }

    /// Waits until an item is readable or `timeout_ms` passes (-1 = forever, 0 = just check);
    /// returns how many are ready.
    pub fn poll(&mut self, timeout_ms: i64) -> Result<usize> {
        // The items' sockets outlive 'a, which outlives self.
        poll_items(&mut self.items, timeout_ms)
    }

    /// Whether item `i` was readable at the last poll.
    pub fn readable(&self, i: usize) -> bool {
        self.items[i].revents & POLLIN != 0
    }
}

/// Waits until one of `sockets` is readable or `timeout_ms` passes, like a [`PollSet`] built
/// for this one call, but with the items on the stack: for a loop that cannot keep a
/// `PollSet` borrowing sockets it owns. Returns which sockets were readable.
pub fn poll_readable<const N: usize>(sockets: [&Socket; N], timeout_ms: i64) -> Result<[bool; N]> {
    let mut items = sockets.map(|s| sys::zmq_pollitem_t {
        socket: s.raw,
        fd: 0,
        events: POLLIN,
        revents: 0,
    });
    // SAFETY: `items` holds N initialised poll items whose sockets are borrowed for the call.
    check("zmq_poll", unsafe {
        sys::zmq_poll(items.as_mut_ptr(), N as c_int, timeout_ms as _)
    })?;
    Ok(items.map(|i| i.revents & POLLIN != 0))
}

/// Poll items kept between calls for a loop whose sockets are borrowed elsewhere between
/// polls (so it cannot hold a [`PollSet`]): each call refills the items from the sockets it
/// is lent for that call, without allocating once the capacity is reached.
#[derive(Default)]
pub struct PollScratch {
    items: Vec<sys::zmq_pollitem_t>,
}

impl PollScratch {
    pub fn with_capacity(n: usize) -> Self {
        PollScratch {
            items: Vec::with_capacity(n),
        }
    }

    /// Waits until one of `sockets` is readable or `timeout_ms` passes (-1 = forever);
    /// returns how many are ready.
    pub fn poll_readable<'s>(
        &mut self,
        sockets: impl Iterator<Item = &'s Socket>,
        timeout_ms: i64,
    ) -> Result<usize> {
        self.items.clear();
        self.items.extend(sockets.map(|s| sys::zmq_pollitem_t {
            socket: s.raw,
            fd: 0,
            events: POLLIN,
            revents: 0,
        }));
        // Built in this call from sockets borrowed for its duration: every one is live.
        poll_items(&mut self.items, timeout_ms)
    }
}

/// libzmq's version, e.g. (4, 3, 4).
pub fn version() -> (i32, i32, i32) {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: three live ints.
    unsafe { sys::zmq_version(&mut a, &mut b, &mut c) };
    (a, b, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_dealer_round_trip_over_inproc() {
        let ctx = Context::new().unwrap();
        let router = ctx.socket(SocketType::Router).unwrap();
        router.bind("inproc://t").unwrap();
        let dealer = ctx.socket(SocketType::Dealer).unwrap();
        dealer.set_identity(b"client-7").unwrap();
        dealer.connect("inproc://t").unwrap();
        dealer.send(b"hello", 0).unwrap();
        let mut id = Message::new();
        let mut body = Message::new();
        assert!(router.recv_msg(&mut id, 0).unwrap());
        assert!(!router.recv_msg(&mut body, 0).unwrap());
        assert_eq!(id.as_slice(), b"client-7");
        assert_eq!(body.as_slice(), b"hello");
        // Moving messages to another thread and back keeps their content.
        let moved = std::thread::spawn(move || (id, body)).join().unwrap();
        let (mut id, mut body) = moved;
        router.send_msg(&mut id, SNDMORE).unwrap();
        router.send_msg(&mut body, 0).unwrap();
        let mut buf = [0u8; 16];
        let (n, more) = dealer.recv_into(&mut buf, 0).unwrap();
        assert_eq!((&buf[..n], more), (&b"hello"[..], false));
    }

    #[test]
    fn nonblocking_recv_reports_would_block_and_poll_times_out() {
        let ctx = Context::new().unwrap();
        let s = ctx.socket(SocketType::Pull).unwrap();
        s.bind("tcp://127.0.0.1:*").unwrap();
        assert!(s.last_endpoint().unwrap().starts_with("tcp://127.0.0.1:"));
        let mut m = Message::new();
        let err = s.recv_msg(&mut m, DONTWAIT).unwrap_err();
        assert!(err.would_block(), "{err}");
        let mut set = PollSet::new(&[PollTarget::Socket(&s)]);
        assert_eq!(set.poll(10).unwrap(), 0);
        assert!(!set.readable(0));
    }

    #[test]
    fn bad_endpoint_is_an_error_not_a_panic() {
        let ctx = Context::new().unwrap();
        let s = ctx.socket(SocketType::Rep).unwrap();
        assert!(s.bind("nonsense://x").is_err());
        assert!(s.bind("tcp://a\0b").is_err());
    }

    #[test]
    fn large_message_shares_content() {
        let data = vec![7u8; 100_000];
        let mut m = Message::from_slice(&data).unwrap();
        let s = m.share().unwrap();
        let t = m.take();
        let mut w = Message::with_size(3).unwrap();
        w.as_mut_slice().copy_from_slice(b"abc");
        assert_eq!(w.as_slice(), b"abc");
        assert!(m.is_empty());
        assert_eq!(s.as_slice(), &data[..]);
        assert_eq!(t.as_slice(), &data[..]);
        assert!(version().0 >= 4);
    }

    /// docs/security.md says the static libzmq has no CURVE (zmq-sys builds it without
    /// libsodium): this keeps that sentence true.
    #[test]
    fn the_static_libzmq_has_no_curve() {
        assert!(has("ipc"), "zmq_has answers");
        assert!(
            !has("curve"),
            "CURVE is built in now: update docs/security.md"
        );
    }

    #[test]
    fn a_monitor_reports_a_connection_and_its_loss() {
        let ctx = Context::new().unwrap();
        let server = ctx.socket(SocketType::Router).unwrap();
        server.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = server.last_endpoint().unwrap();
        let client = ctx.socket(SocketType::Dealer).unwrap();
        let pair = ctx
            .monitor(&client, EVENT_HANDSHAKE_SUCCEEDED | EVENT_DISCONNECTED)
            .unwrap();
        client.connect(&endpoint).unwrap();
        let mut scratch = Message::new();
        let mut wait_for = |want: u32| {
            for _ in 0..500 {
                if let Some(ev) = MonitorEvent::read(&pair, &mut scratch).unwrap() {
                    if ev.event == want {
                        return;
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("no event {want}");
        };
        wait_for(EVENT_HANDSHAKE_SUCCEEDED);
        drop(server);
        wait_for(EVENT_DISCONNECTED);
    }
}

//! The safe rdma_cm layer: an event channel, communication ids (listen / resolve / accept /
//! connect with private data) and CM events copied out of librdmacm with a typed kind
//! ([`CmEventKind`]). The raw bindings are in [`super::sys::cm`].
//!
//! Ownership: every [`CmId`] keeps its [`EventChannel`] alive (an `Arc`), so the channel is
//! destroyed after the last id on it.

use std::ffi::{c_int, c_void};
use std::net::SocketAddr;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use super::conn::{Rdma, RdmaError};
use super::sys::cm::{self as sys, rdma_cm_event, rdma_cm_id, rdma_event_channel, CmError, RdmaCm};
use super::verbs::c_enum;

c_enum!(
    /// `enum rdma_cm_event_type`: what a CM event reports.
    CmEventKind(sys::rdma_cm_event_type), other = Other {
        AddrResolved = sys::RDMA_CM_EVENT_ADDR_RESOLVED,
        AddrError = sys::RDMA_CM_EVENT_ADDR_ERROR,
        RouteResolved = sys::RDMA_CM_EVENT_ROUTE_RESOLVED,
        RouteError = sys::RDMA_CM_EVENT_ROUTE_ERROR,
        /// A client asks to connect; the event carries the new connection's id.
        ConnectRequest = sys::RDMA_CM_EVENT_CONNECT_REQUEST,
        ConnectResponse = sys::RDMA_CM_EVENT_CONNECT_RESPONSE,
        ConnectError = sys::RDMA_CM_EVENT_CONNECT_ERROR,
        Unreachable = sys::RDMA_CM_EVENT_UNREACHABLE,
        Rejected = sys::RDMA_CM_EVENT_REJECTED,
        Established = sys::RDMA_CM_EVENT_ESTABLISHED,
        Disconnected = sys::RDMA_CM_EVENT_DISCONNECTED,
        DeviceRemoval = sys::RDMA_CM_EVENT_DEVICE_REMOVAL,
        MulticastJoin = sys::RDMA_CM_EVENT_MULTICAST_JOIN,
        MulticastError = sys::RDMA_CM_EVENT_MULTICAST_ERROR,
        AddrChange = sys::RDMA_CM_EVENT_ADDR_CHANGE,
        TimewaitExit = sys::RDMA_CM_EVENT_TIMEWAIT_EXIT,
    }
);

/// An rdma_cm event channel (destroyed when the last handle and id drop).
#[derive(Debug)]
pub struct EventChannel {
    cm: &'static RdmaCm,
    ch: NonNull<rdma_event_channel>,
}

// SAFETY: a channel is a file descriptor wrapper; librdmacm calls on it are thread-safe.
unsafe impl Send for EventChannel {}
// SAFETY: as above.
unsafe impl Sync for EventChannel {}

impl EventChannel {
    pub fn new(rdma: Rdma) -> Result<Arc<EventChannel>, RdmaError> {
        let ch = rdma.cm.create_event_channel().map_err(|e| {
            if e.errno == libc::ENODEV || e.errno == libc::ENOENT || e.errno == libc::ENOSYS {
                RdmaError::NoDevice(e.to_string())
            } else {
                RdmaError::Cm(e)
            }
        })?;
        Ok(Arc::new(EventChannel { cm: rdma.cm, ch }))
    }

    fn fd(&self) -> c_int {
        // SAFETY: ch is live until Drop; fd is never changed.
        unsafe { self.ch.as_ref().fd }
    }

    /// Waits up to `timeout_ms` (0 = just look, -1 = forever) for the next CM event, acks it
    /// and returns a copy of what it carried. A CONNECT_REQUEST's new id comes back owned.
    pub fn next(self: &Arc<Self>, timeout_ms: i32) -> Result<Option<CmEvent>, RdmaError> {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is one live pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let e = CmError::last("poll");
            if e.errno == libc::EINTR {
                return Ok(None);
            }
            return Err(e.into());
        }
        if rc == 0 {
            return Ok(None);
        }
        let mut ev: *mut rdma_cm_event = ptr::null_mut();
        // SAFETY: the channel is live; ev receives an event owned by librdmacm until acked.
        // The fd is readable, so this does not block.
        CmError::check("rdma_get_cm_event", unsafe {
            (self.cm.rdma_get_cm_event)(self.ch.as_ptr(), &mut ev)
        })?;
        let Some(evp) = NonNull::new(ev) else {
            return Err(RdmaError::Other(
                "rdma_get_cm_event returned no event".into(),
            ));
        };
        // SAFETY: a live, unacked event.
        let e = unsafe { evp.as_ref() };
        let raw_kind = e.event;
        let kind = CmEventKind::from_raw(raw_kind);
        // SAFETY: param.conn is what librdmacm fills for every event of an RC (TCP port
        // space) id; for events without private data its pointer is null and we get [].
        let private = unsafe { e.conn_private_data() }.to_vec();
        let out = CmEvent {
            kind,
            name: self.cm.event_str(raw_kind),
            status: e.status,
            id: e.id as usize,
            listen_id: e.listen_id as usize,
            private_data: private,
            new_id: None,
        };
        let new_raw = e.id;
        // SAFETY: acked exactly once; nothing from the event is used afterwards (copied).
        CmError::check("rdma_ack_cm_event", unsafe {
            (self.cm.rdma_ack_cm_event)(ev)
        })?;
        let mut out = out;
        if kind == CmEventKind::ConnectRequest {
            if let Some(id) = NonNull::new(new_raw) {
                // The new id of a connection request belongs to the application (destroyed
                // with rdma_destroy_id); it stays valid after the ack.
                out.new_id = Some(CmId {
                    cm: self.cm,
                    id,
                    channel: self.clone(),
                });
            }
        }
        Ok(Some(out))
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on the channel holds an Arc to it, so none is left; destroyed once.
        unsafe { (self.cm.rdma_destroy_event_channel)(self.ch.as_ptr()) };
    }
}

/// A CM event, copied out and already acknowledged.
#[derive(Debug)]
pub struct CmEvent {
    pub kind: CmEventKind,
    pub name: String,
    pub status: i32,
    /// The id the event is for, as an opaque handle (compare with [`CmId::handle`]).
    pub id: usize,
    pub listen_id: usize,
    pub private_data: Vec<u8>,
    /// CONNECT_REQUEST only: the new connection's id, owned by the receiver.
    pub new_id: Option<CmId>,
}

/// An owned rdma_cm id (a "socket" of rdma_cm).
#[derive(Debug)]
pub struct CmId {
    cm: &'static RdmaCm,
    pub(crate) id: NonNull<rdma_cm_id>,
    channel: Arc<EventChannel>,
}

// SAFETY: librdmacm calls on an id are thread-safe; the id is only destroyed in Drop.
unsafe impl Send for CmId {}
// SAFETY: as above.
unsafe impl Sync for CmId {}

fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

impl CmId {
    /// A new RC (port space TCP) id on `channel`.
    pub fn new(rdma: Rdma, channel: &Arc<EventChannel>) -> Result<CmId, RdmaError> {
        let mut id: *mut rdma_cm_id = ptr::null_mut();
        // SAFETY: the channel is live; id receives a new id owned by us.
        CmError::check("rdma_create_id", unsafe {
            (rdma.cm.rdma_create_id)(
                channel.ch.as_ptr(),
                &mut id,
                ptr::null_mut(),
                sys::RDMA_PS_TCP,
            )
        })?;
        let id = NonNull::new(id)
            .ok_or_else(|| RdmaError::Other("rdma_create_id returned no id".into()))?;
        Ok(CmId {
            cm: rdma.cm,
            id,
            channel: channel.clone(),
        })
    }

    /// An opaque handle identifying this id in [`CmEvent::id`].
    pub fn handle(&self) -> usize {
        self.id.as_ptr() as usize
    }

    /// Whether the id is bound to a device (after resolve or on an incoming connection).
    pub fn has_device(&self) -> bool {
        // SAFETY: the id is live.
        !unsafe { self.id.as_ref() }.verbs.is_null()
    }

    /// `rdma_bind_addr` + `rdma_listen`; returns the bound port (useful with port 0).
    pub fn listen(&self, addr: &SocketAddr, backlog: i32) -> Result<u16, RdmaError> {
        let (mut ss, _) = sockaddr_of(addr);
        // SAFETY: the id is live; ss is a valid sockaddr of the right family.
        CmError::check("rdma_bind_addr", unsafe {
            (self.cm.rdma_bind_addr)(self.id.as_ptr(), &mut ss as *mut _ as *mut libc::sockaddr)
        })?;
        // SAFETY: the id is live and bound.
        CmError::check("rdma_listen", unsafe {
            (self.cm.rdma_listen)(self.id.as_ptr(), backlog)
        })?;
        // SAFETY: route.addr.src is filled by rdma_bind_addr; the port sits at the same offset
        // for sockaddr_in and sockaddr_in6.
        let port = unsafe { self.id.as_ref().route.addr.src.sin.sin_port };
        Ok(u16::from_be(port))
    }

    /// `rdma_resolve_addr` (the caller waits for ADDR_RESOLVED).
    pub fn resolve_addr(&self, dst: &SocketAddr, timeout_ms: i32) -> Result<(), RdmaError> {
        let (mut ss, _) = sockaddr_of(dst);
        // SAFETY: the id is live; ss is a valid sockaddr; a null source lets rdma_cm choose.
        CmError::check("rdma_resolve_addr", unsafe {
            (self.cm.rdma_resolve_addr)(
                self.id.as_ptr(),
                ptr::null_mut(),
                &mut ss as *mut _ as *mut libc::sockaddr,
                timeout_ms,
            )
        })?;
        Ok(())
    }

    /// `rdma_resolve_route` (the caller waits for ROUTE_RESOLVED).
    pub fn resolve_route(&self, timeout_ms: i32) -> Result<(), RdmaError> {
        // SAFETY: the id is live with a resolved address.
        CmError::check("rdma_resolve_route", unsafe {
            (self.cm.rdma_resolve_route)(self.id.as_ptr(), timeout_ms)
        })?;
        Ok(())
    }

    /// `rdma_reject` with up to 148 bytes of private data (a reason for the peer).
    pub fn reject(&self, private: &[u8]) -> Result<(), RdmaError> {
        let len = private.len().min(148);
        // SAFETY: the id is live; private is readable for len bytes during the call.
        CmError::check("rdma_reject", unsafe {
            (self.cm.rdma_reject)(
                self.id.as_ptr(),
                private.as_ptr() as *const c_void,
                len as u8,
            )
        })?;
        Ok(())
    }

    /// The channel this id reports on.
    pub fn channel(&self) -> &Arc<EventChannel> {
        &self.channel
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: an id we own, destroyed once; its events were acked when received (next()).
        unsafe { (self.cm.rdma_destroy_id)(self.id.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_map_every_constant_both_ways() {
        for &k in CmEventKind::ALL {
            assert_eq!(CmEventKind::from_raw(k.raw()), k);
        }
        assert_eq!(CmEventKind::ALL.len(), 16);
        assert_eq!(
            CmEventKind::from_raw(sys::RDMA_CM_EVENT_ESTABLISHED),
            CmEventKind::Established
        );
        assert_eq!(CmEventKind::from_raw(77), CmEventKind::Other(77));
        assert_eq!(CmEventKind::Other(77).raw(), 77);
    }
}

//! Hand-written librdmacm bindings (`<rdma/rdma_cma.h>`), loaded at run time like
//! [`super::verbs`]: `dlopen("librdmacm.so.1")`, no build-time dependency on rdma-core.
//!
//! rdma_cm does the connection setup of an RC queue pair over IP addresses (address and route
//! resolution, connect/accept with private data, the QP state transitions); the data path then
//! uses [`super::verbs`] on `rdma_cm_id::qp`. librdmacm itself loads the same libibverbs
//! instance (one copy per process), so contexts from `rdma_cm_id::verbs` work with
//! [`super::verbs::Verbs`].
//!
//! Struct sizes/offsets and the constants are checked against the system header by
//! `ffi/tests/layout.rs`.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::ptr::NonNull;
use std::sync::OnceLock;

use thiserror::Error;

use super::verbs::{
    errno_text, ibv_ah_attr, ibv_comp_channel, ibv_context, ibv_cq, ibv_gid, ibv_pd, ibv_qp,
    ibv_qp_init_attr, ibv_qp_type, ibv_srq,
};
pub use crate::dl::DlError;
use crate::dl::Library;

/// Sonames tried by [`RdmaCm::load`].
pub const LIBRDMACM_SONAMES: &[&str] = &["librdmacm.so.1"];
/// The package to install when librdmacm is missing (named in the error).
pub const LIBRDMACM_PACKAGE: &str = "rdma-core";

// ---------------------------------------------------------------------------------------------
// Enums and constants.

pub type rdma_cm_event_type = c_uint;
pub type rdma_port_space = c_uint;

pub const RDMA_CM_EVENT_ADDR_RESOLVED: rdma_cm_event_type = 0;
pub const RDMA_CM_EVENT_ADDR_ERROR: rdma_cm_event_type = 1;
pub const RDMA_CM_EVENT_ROUTE_RESOLVED: rdma_cm_event_type = 2;
pub const RDMA_CM_EVENT_ROUTE_ERROR: rdma_cm_event_type = 3;
pub const RDMA_CM_EVENT_CONNECT_REQUEST: rdma_cm_event_type = 4;
pub const RDMA_CM_EVENT_CONNECT_RESPONSE: rdma_cm_event_type = 5;
pub const RDMA_CM_EVENT_CONNECT_ERROR: rdma_cm_event_type = 6;
pub const RDMA_CM_EVENT_UNREACHABLE: rdma_cm_event_type = 7;
pub const RDMA_CM_EVENT_REJECTED: rdma_cm_event_type = 8;
pub const RDMA_CM_EVENT_ESTABLISHED: rdma_cm_event_type = 9;
pub const RDMA_CM_EVENT_DISCONNECTED: rdma_cm_event_type = 10;
pub const RDMA_CM_EVENT_DEVICE_REMOVAL: rdma_cm_event_type = 11;
pub const RDMA_CM_EVENT_MULTICAST_JOIN: rdma_cm_event_type = 12;
pub const RDMA_CM_EVENT_MULTICAST_ERROR: rdma_cm_event_type = 13;
pub const RDMA_CM_EVENT_ADDR_CHANGE: rdma_cm_event_type = 14;
pub const RDMA_CM_EVENT_TIMEWAIT_EXIT: rdma_cm_event_type = 15;

pub const RDMA_PS_IPOIB: rdma_port_space = 0x0002;
/// Reliable connected (RC) port space.
pub const RDMA_PS_TCP: rdma_port_space = 0x0106;
pub const RDMA_PS_UDP: rdma_port_space = 0x0111;
pub const RDMA_PS_IB: rdma_port_space = 0x013F;

pub const RDMA_MAX_RESP_RES: u8 = 0xFF;
pub const RDMA_MAX_INIT_DEPTH: u8 = 0xFF;

/// `rdma_set_option` levels and names.
pub const RDMA_OPTION_ID: c_int = 0;
pub const RDMA_OPTION_IB: c_int = 1;
pub const RDMA_OPTION_ID_TOS: c_int = 0;
pub const RDMA_OPTION_ID_REUSEADDR: c_int = 1;
pub const RDMA_OPTION_ID_AFONLY: c_int = 2;
pub const RDMA_OPTION_ID_ACK_TIMEOUT: c_int = 3;

// ---------------------------------------------------------------------------------------------
// Structs.

/// `struct ibv_sa_path_rec` (only ever behind a pointer here).
#[repr(C)]
pub struct ibv_sa_path_rec {
    _data: [u8; 0],
    _marker: std::marker::PhantomData<(*mut u8, std::marker::PhantomPinned)>,
}

/// A completion channel for CM events; `fd` can be polled (set it non-blocking to poll
/// `rdma_get_cm_event`).
#[repr(C)]
#[derive(Debug)]
pub struct rdma_event_channel {
    pub fd: c_int,
}

/// `struct rdma_ib_addr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct rdma_ib_addr {
    pub sgid: ibv_gid,
    pub dgid: ibv_gid,
    /// Big-endian.
    pub pkey: u16,
}

/// One side's address in `struct rdma_addr` (C: an anonymous union of `sockaddr`,
/// `sockaddr_in`, `sockaddr_in6` and `sockaddr_storage`).
#[repr(C)]
#[derive(Clone, Copy)]
pub union rdma_sockaddr {
    pub addr: libc::sockaddr,
    pub sin: libc::sockaddr_in,
    pub sin6: libc::sockaddr_in6,
    pub storage: libc::sockaddr_storage,
}

/// `rdma_addr::addr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union rdma_addr_addr {
    pub ibaddr: rdma_ib_addr,
}

/// `struct rdma_addr`: C's `src_addr`/`src_sin`/... members are `src.addr`/`src.sin`/...
#[repr(C)]
#[derive(Clone, Copy)]
pub struct rdma_addr {
    pub src: rdma_sockaddr,
    pub dst: rdma_sockaddr,
    pub addr: rdma_addr_addr,
}

/// `struct rdma_route`.
#[repr(C)]
pub struct rdma_route {
    pub addr: rdma_addr,
    pub path_rec: *mut ibv_sa_path_rec,
    pub num_paths: c_int,
}

/// A communication identifier, the rdma_cm analogue of a socket (owned by librdmacm).
/// `rdma_get_local_addr(id)` / `rdma_get_peer_addr(id)` (inline in the header) are
/// `&(*id).route.addr.src.addr` / `&(*id).route.addr.dst.addr`.
#[repr(C)]
pub struct rdma_cm_id {
    /// The device context, set once the address is bound/resolved.
    pub verbs: *mut ibv_context,
    pub channel: *mut rdma_event_channel,
    /// The user context passed to `rdma_create_id` (inherited by accepted ids).
    pub context: *mut c_void,
    /// Set by `rdma_create_qp`.
    pub qp: *mut ibv_qp,
    pub route: rdma_route,
    pub ps: rdma_port_space,
    pub port_num: u8,
    pub event: *mut rdma_cm_event,
    pub send_cq_channel: *mut ibv_comp_channel,
    pub send_cq: *mut ibv_cq,
    pub recv_cq_channel: *mut ibv_comp_channel,
    pub recv_cq: *mut ibv_cq,
    pub srq: *mut ibv_srq,
    pub pd: *mut ibv_pd,
    pub qp_type: ibv_qp_type,
}

/// Connection parameters for `rdma_connect`/`rdma_accept` (and received with
/// CONNECT_REQUEST/ESTABLISHED events).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rdma_conn_param {
    pub private_data: *const c_void,
    pub private_data_len: u8,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub flow_control: u8,
    /// Ignored when accepting.
    pub retry_count: u8,
    pub rnr_retry_count: u8,
    /// Fields from here on are ignored if a QP is created on the id.
    pub srq: u8,
    pub qp_num: u32,
}

/// UD parameters of an event (`struct rdma_ud_param`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct rdma_ud_param {
    pub private_data: *const c_void,
    pub private_data_len: u8,
    pub ah_attr: ibv_ah_attr,
    pub qp_num: u32,
    pub qkey: u32,
}

/// `rdma_cm_event::param`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union rdma_cm_event_param {
    pub conn: rdma_conn_param,
    pub ud: rdma_ud_param,
}

/// A CM event (from `rdma_get_cm_event`, released with `rdma_ack_cm_event`, which also frees
/// the private data `param.conn.private_data` points to).
#[repr(C)]
pub struct rdma_cm_event {
    pub id: *mut rdma_cm_id,
    /// The listening id, for CONNECT_REQUEST.
    pub listen_id: *mut rdma_cm_id,
    pub event: rdma_cm_event_type,
    pub status: c_int,
    pub param: rdma_cm_event_param,
}

impl Default for rdma_conn_param {
    fn default() -> Self {
        // SAFETY: integers and a raw pointer: all-zero is valid (the C idiom `= {0}`).
        unsafe { std::mem::zeroed() }
    }
}

impl rdma_cm_event {
    /// The private data of a connection event (CONNECT_REQUEST, ESTABLISHED, REJECTED...).
    ///
    /// # Safety
    /// The event must be a connection event (so `param.conn` is the active member), not yet
    /// acknowledged; the slice dies with `rdma_ack_cm_event`.
    pub unsafe fn conn_private_data(&self) -> &[u8] {
        // SAFETY: the caller guarantees param.conn is the member librdmacm filled.
        let conn = unsafe { self.param.conn };
        if conn.private_data.is_null() || conn.private_data_len == 0 {
            return &[];
        }
        // SAFETY: librdmacm keeps private_data_len bytes at private_data until the ack.
        unsafe {
            std::slice::from_raw_parts(
                conn.private_data as *const u8,
                conn.private_data_len as usize,
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// A librdmacm call failed (they return -1 or NULL and set errno).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{call}: {text} (errno {errno})")]
pub struct CmError {
    pub call: &'static str,
    pub errno: i32,
    pub text: String,
}

impl CmError {
    /// From errno as the failed call left it.
    pub fn last(call: &'static str) -> Self {
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        CmError {
            call,
            errno,
            text: errno_text(errno),
        }
    }

    /// `Ok` for a zero return, the errno-based error otherwise.
    pub fn check(call: &'static str, rc: c_int) -> Result<(), CmError> {
        if rc == 0 {
            Ok(())
        } else {
            Err(CmError::last(call))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The loaded library.

pub type RdmaCreateEventChannelFn = unsafe extern "C" fn() -> *mut rdma_event_channel;
pub type RdmaDestroyEventChannelFn = unsafe extern "C" fn(channel: *mut rdma_event_channel);
pub type RdmaCreateIdFn = unsafe extern "C" fn(
    channel: *mut rdma_event_channel,
    id: *mut *mut rdma_cm_id,
    context: *mut c_void,
    ps: rdma_port_space,
) -> c_int;
pub type RdmaDestroyIdFn = unsafe extern "C" fn(id: *mut rdma_cm_id) -> c_int;
pub type RdmaBindAddrFn =
    unsafe extern "C" fn(id: *mut rdma_cm_id, addr: *mut libc::sockaddr) -> c_int;
pub type RdmaListenFn = unsafe extern "C" fn(id: *mut rdma_cm_id, backlog: c_int) -> c_int;
pub type RdmaResolveAddrFn = unsafe extern "C" fn(
    id: *mut rdma_cm_id,
    src_addr: *mut libc::sockaddr,
    dst_addr: *mut libc::sockaddr,
    timeout_ms: c_int,
) -> c_int;
pub type RdmaResolveRouteFn = unsafe extern "C" fn(id: *mut rdma_cm_id, timeout_ms: c_int) -> c_int;
pub type RdmaGetCmEventFn =
    unsafe extern "C" fn(channel: *mut rdma_event_channel, event: *mut *mut rdma_cm_event) -> c_int;
pub type RdmaAckCmEventFn = unsafe extern "C" fn(event: *mut rdma_cm_event) -> c_int;
pub type RdmaConnectFn =
    unsafe extern "C" fn(id: *mut rdma_cm_id, conn_param: *mut rdma_conn_param) -> c_int;
pub type RdmaAcceptFn =
    unsafe extern "C" fn(id: *mut rdma_cm_id, conn_param: *mut rdma_conn_param) -> c_int;
pub type RdmaRejectFn = unsafe extern "C" fn(
    id: *mut rdma_cm_id,
    private_data: *const c_void,
    private_data_len: u8,
) -> c_int;
pub type RdmaDisconnectFn = unsafe extern "C" fn(id: *mut rdma_cm_id) -> c_int;
pub type RdmaCreateQpFn = unsafe extern "C" fn(
    id: *mut rdma_cm_id,
    pd: *mut ibv_pd,
    qp_init_attr: *mut ibv_qp_init_attr,
) -> c_int;
pub type RdmaDestroyQpFn = unsafe extern "C" fn(id: *mut rdma_cm_id);
pub type RdmaEventStrFn = unsafe extern "C" fn(event: rdma_cm_event_type) -> *const c_char;
pub type RdmaSetOptionFn = unsafe extern "C" fn(
    id: *mut rdma_cm_id,
    level: c_int,
    optname: c_int,
    optval: *mut c_void,
    optlen: usize,
) -> c_int;

/// librdmacm's exported functions, resolved at run time. Each field is the C function of the
/// same name with its exact prototype; calling one is `unsafe` with the C API's contract.
#[derive(Debug)]
pub struct RdmaCm {
    lib: Library,
    pub rdma_create_event_channel: RdmaCreateEventChannelFn,
    pub rdma_destroy_event_channel: RdmaDestroyEventChannelFn,
    pub rdma_create_id: RdmaCreateIdFn,
    pub rdma_destroy_id: RdmaDestroyIdFn,
    pub rdma_bind_addr: RdmaBindAddrFn,
    pub rdma_listen: RdmaListenFn,
    pub rdma_resolve_addr: RdmaResolveAddrFn,
    pub rdma_resolve_route: RdmaResolveRouteFn,
    pub rdma_get_cm_event: RdmaGetCmEventFn,
    pub rdma_ack_cm_event: RdmaAckCmEventFn,
    pub rdma_connect: RdmaConnectFn,
    pub rdma_accept: RdmaAcceptFn,
    pub rdma_reject: RdmaRejectFn,
    pub rdma_disconnect: RdmaDisconnectFn,
    pub rdma_create_qp: RdmaCreateQpFn,
    pub rdma_destroy_qp: RdmaDestroyQpFn,
    pub rdma_event_str: RdmaEventStrFn,
    pub rdma_set_option: RdmaSetOptionFn,
}

const RDMACM_1_0: Option<&str> = Some("RDMACM_1.0");

static RDMACM: OnceLock<Result<RdmaCm, DlError>> = OnceLock::new();

impl RdmaCm {
    /// Loads librdmacm once per process (later calls return the same result).
    pub fn load() -> Result<&'static RdmaCm, DlError> {
        RDMACM
            .get_or_init(|| RdmaCm::load_from(LIBRDMACM_SONAMES))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Opens the first of `sonames` and resolves every symbol (not cached).
    pub fn load_from(sonames: &[&'static str]) -> Result<RdmaCm, DlError> {
        let lib = Library::open(sonames, LIBRDMACM_PACKAGE)?;
        // SAFETY: each type alias above is the exact C prototype from rdma-core's rdma_cma.h of
        // the symbol resolved into it (all at librdmacm's only symbol version, RDMACM_1.0).
        unsafe {
            Ok(RdmaCm {
                rdma_create_event_channel: lib.sym("rdma_create_event_channel", RDMACM_1_0)?,
                rdma_destroy_event_channel: lib.sym("rdma_destroy_event_channel", RDMACM_1_0)?,
                rdma_create_id: lib.sym("rdma_create_id", RDMACM_1_0)?,
                rdma_destroy_id: lib.sym("rdma_destroy_id", RDMACM_1_0)?,
                rdma_bind_addr: lib.sym("rdma_bind_addr", RDMACM_1_0)?,
                rdma_listen: lib.sym("rdma_listen", RDMACM_1_0)?,
                rdma_resolve_addr: lib.sym("rdma_resolve_addr", RDMACM_1_0)?,
                rdma_resolve_route: lib.sym("rdma_resolve_route", RDMACM_1_0)?,
                rdma_get_cm_event: lib.sym("rdma_get_cm_event", RDMACM_1_0)?,
                rdma_ack_cm_event: lib.sym("rdma_ack_cm_event", RDMACM_1_0)?,
                rdma_connect: lib.sym("rdma_connect", RDMACM_1_0)?,
                rdma_accept: lib.sym("rdma_accept", RDMACM_1_0)?,
                rdma_reject: lib.sym("rdma_reject", RDMACM_1_0)?,
                rdma_disconnect: lib.sym("rdma_disconnect", RDMACM_1_0)?,
                rdma_create_qp: lib.sym("rdma_create_qp", RDMACM_1_0)?,
                rdma_destroy_qp: lib.sym("rdma_destroy_qp", RDMACM_1_0)?,
                rdma_event_str: lib.sym("rdma_event_str", RDMACM_1_0)?,
                rdma_set_option: lib.sym("rdma_set_option", RDMACM_1_0)?,
                lib,
            })
        }
    }

    /// The soname that was opened.
    pub fn library(&self) -> &'static str {
        self.lib.soname()
    }

    /// `rdma_event_str`: the event's name, e.g. "RDMA_CM_EVENT_ESTABLISHED".
    pub fn event_str(&self, event: rdma_cm_event_type) -> String {
        // SAFETY: takes any value and returns a static NUL-terminated string.
        let p = unsafe { (self.rdma_event_str)(event) };
        if p.is_null() {
            return format!("event {event}");
        }
        // SAFETY: non-null static C string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// `rdma_create_event_channel` (fails with ENODEV on a machine without RDMA devices). The
    /// caller owns the channel and must pass it to `rdma_destroy_event_channel` exactly once,
    /// after destroying the ids on it.
    pub fn create_event_channel(&self) -> Result<NonNull<rdma_event_channel>, CmError> {
        // SAFETY: no arguments; returns null (errno set) or a channel owned by the caller.
        let ch = unsafe { (self.rdma_create_event_channel)() };
        NonNull::new(ch).ok_or_else(|| CmError::last("rdma_create_event_channel"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_error_names_it() {
        let err = RdmaCm::load_from(&["librdmacm-hacserve-missing.so.1"]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("librdmacm-hacserve-missing.so.1 not found (is rdma-core installed?)"),
            "{err}"
        );
    }

    /// With rdma-core installed: dlopen, every symbol resolves, and real calls work.
    #[test]
    fn loads_librdmacm_and_calls_it() {
        let cm = match RdmaCm::load() {
            Ok(cm) => cm,
            Err(e) => {
                eprintln!("SKIPPED: {e} (apt-get install rdma-core librdmacm1)");
                return;
            }
        };
        assert_eq!(cm.library(), "librdmacm.so.1");
        assert_eq!(
            cm.event_str(RDMA_CM_EVENT_ESTABLISHED),
            "RDMA_CM_EVENT_ESTABLISHED"
        );
        assert_eq!(
            cm.event_str(RDMA_CM_EVENT_CONNECT_REQUEST),
            "RDMA_CM_EVENT_CONNECT_REQUEST"
        );
        match cm.create_event_channel() {
            Ok(ch) => {
                // SAFETY: a channel we own, with no ids on it, destroyed once.
                unsafe {
                    assert!(ch.as_ref().fd >= 0);
                    (cm.rdma_destroy_event_channel)(ch.as_ptr());
                }
            }
            // No RDMA device / no rdma_cm in the kernel here.
            Err(e) => {
                eprintln!("rdma_create_event_channel: {e}");
                assert!(e.errno != 0, "{e}");
            }
        }
    }

    #[test]
    fn conn_private_data_of_a_synthetic_event() {
        let payload = *b"hacserve";
        // SAFETY: all-zero is a valid rdma_cm_event (null pointers, zero integers).
        let mut ev: rdma_cm_event = unsafe { std::mem::zeroed() };
        ev.event = RDMA_CM_EVENT_CONNECT_REQUEST;
        ev.param.conn = rdma_conn_param {
            private_data: payload.as_ptr() as *const c_void,
            private_data_len: payload.len() as u8,
            ..Default::default()
        };
        // SAFETY: param.conn is the member written; payload outlives the slice.
        assert_eq!(unsafe { ev.conn_private_data() }, b"hacserve");
        ev.param.conn.private_data_len = 0;
        // SAFETY: as above.
        assert!(unsafe { ev.conn_private_data() }.is_empty());
    }
}

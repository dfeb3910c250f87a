//! Hand-written libibverbs bindings, loaded at run time (no build-time dependency on
//! rdma-core, no bindgen, no link to libibverbs), the way NCCL's `ibvwrap` does it.
//!
//! * `#[repr(C)]` mirrors of exactly the rdma-core `<infiniband/verbs.h>` structs hacserve
//!   needs for an RC connection with RDMA WRITE_WITH_IMM, receive completions and memory
//!   registration. Their sizes, alignments and field offsets, and every constant below, are
//!   checked against the system header by `ffi/tests/layout.rs`.
//! * [`Verbs`]: the exported functions, resolved once with `dlopen("libibverbs.so.1")` +
//!   `dlvsym` (the symbol versions NCCL uses, so an old ABI of the same name is never picked).
//! * [`post_send`], [`post_recv`], [`poll_cq`], [`req_notify_cq`]: `static inline` in
//!   verbs.h, they call through the provider's `ibv_context_ops` table, and so do these.
//!
//! C enums are `c_uint`/`c_int` aliases with `pub const` values (a Rust enum would be UB for a
//! value a newer library adds). Names follow the C header so they can be grepped side by side.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::marker::{PhantomData, PhantomPinned};
use std::ptr::{self, NonNull};
use std::sync::OnceLock;

use thiserror::Error;

pub use crate::dl::DlError;
use crate::dl::Library;

/// Sonames tried by [`Verbs::load`].
pub const LIBIBVERBS_SONAMES: &[&str] = &["libibverbs.so.1"];
/// The package to install when libibverbs is missing (named in the error).
pub const LIBIBVERBS_PACKAGE: &str = "rdma-core";

// ---------------------------------------------------------------------------------------------
// Opaque types (only ever behind pointers).

macro_rules! opaque {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {$(
        $(#[$m])*
        #[repr(C)]
        pub struct $name {
            _data: [u8; 0],
            _marker: PhantomData<(*mut u8, PhantomPinned)>,
        }
    )*};
}

opaque!(
    /// Shared receive queue (unused by hacserve; appears in `ibv_qp`/`ibv_qp_init_attr`).
    ibv_srq,
    /// Memory window (appears in the ops table and `ibv_send_wr`).
    ibv_mw,
    /// Memory-window bind request (appears in the ops table).
    ibv_mw_bind,
    /// Address handle (UD only; appears in `ibv_send_wr`).
    ibv_ah,
);

/// Plain-data structs whose all-zero bit pattern is valid (null pointers, zero integers,
/// `None` function pointers): the usual C idiom `struct x a = {0};`.
macro_rules! zeroed_default {
    ($($t:ty),* $(,)?) => {$(
        impl Default for $t {
            fn default() -> Self {
                // SAFETY: every field is an integer, raw pointer, Option<fn>, or an array,
                // struct or union of those, for which all-zero bits are a valid value.
                unsafe { std::mem::zeroed() }
            }
        }
    )*};
}

// ---------------------------------------------------------------------------------------------
// Enums and constants.

pub type ibv_node_type = c_int;
pub type ibv_transport_type = c_int;
pub type ibv_mtu = c_uint;
pub type ibv_port_state = c_uint;
pub type ibv_wc_status = c_uint;
pub type ibv_wc_opcode = c_uint;
pub type ibv_wr_opcode = c_uint;
pub type ibv_qp_type = c_uint;
pub type ibv_qp_state = c_uint;
pub type ibv_mig_state = c_uint;
pub type ibv_mw_type = c_uint;

pub const IBV_SYSFS_NAME_MAX: usize = 64;
pub const IBV_SYSFS_PATH_MAX: usize = 256;

pub const IBV_MTU_256: ibv_mtu = 1;
pub const IBV_MTU_512: ibv_mtu = 2;
pub const IBV_MTU_1024: ibv_mtu = 3;
pub const IBV_MTU_2048: ibv_mtu = 4;
pub const IBV_MTU_4096: ibv_mtu = 5;

pub const IBV_PORT_NOP: ibv_port_state = 0;
pub const IBV_PORT_DOWN: ibv_port_state = 1;
pub const IBV_PORT_INIT: ibv_port_state = 2;
pub const IBV_PORT_ARMED: ibv_port_state = 3;
pub const IBV_PORT_ACTIVE: ibv_port_state = 4;
pub const IBV_PORT_ACTIVE_DEFER: ibv_port_state = 5;

/// `ibv_port_attr::link_layer` values.
pub const IBV_LINK_LAYER_UNSPECIFIED: u8 = 0;
pub const IBV_LINK_LAYER_INFINIBAND: u8 = 1;
pub const IBV_LINK_LAYER_ETHERNET: u8 = 2;

pub const IBV_WC_SUCCESS: ibv_wc_status = 0;
pub const IBV_WC_LOC_LEN_ERR: ibv_wc_status = 1;
pub const IBV_WC_LOC_QP_OP_ERR: ibv_wc_status = 2;
pub const IBV_WC_LOC_EEC_OP_ERR: ibv_wc_status = 3;
pub const IBV_WC_LOC_PROT_ERR: ibv_wc_status = 4;
pub const IBV_WC_WR_FLUSH_ERR: ibv_wc_status = 5;
pub const IBV_WC_MW_BIND_ERR: ibv_wc_status = 6;
pub const IBV_WC_BAD_RESP_ERR: ibv_wc_status = 7;
pub const IBV_WC_LOC_ACCESS_ERR: ibv_wc_status = 8;
pub const IBV_WC_REM_INV_REQ_ERR: ibv_wc_status = 9;
pub const IBV_WC_REM_ACCESS_ERR: ibv_wc_status = 10;
pub const IBV_WC_REM_OP_ERR: ibv_wc_status = 11;
pub const IBV_WC_RETRY_EXC_ERR: ibv_wc_status = 12;
pub const IBV_WC_RNR_RETRY_EXC_ERR: ibv_wc_status = 13;
pub const IBV_WC_LOC_RDD_VIOL_ERR: ibv_wc_status = 14;
pub const IBV_WC_REM_INV_RD_REQ_ERR: ibv_wc_status = 15;
pub const IBV_WC_REM_ABORT_ERR: ibv_wc_status = 16;
pub const IBV_WC_INV_EECN_ERR: ibv_wc_status = 17;
pub const IBV_WC_INV_EEC_STATE_ERR: ibv_wc_status = 18;
pub const IBV_WC_FATAL_ERR: ibv_wc_status = 19;
pub const IBV_WC_RESP_TIMEOUT_ERR: ibv_wc_status = 20;
pub const IBV_WC_GENERAL_ERR: ibv_wc_status = 21;

pub const IBV_WC_SEND: ibv_wc_opcode = 0;
pub const IBV_WC_RDMA_WRITE: ibv_wc_opcode = 1;
pub const IBV_WC_RDMA_READ: ibv_wc_opcode = 2;
/// Receive completions have this bit set (`opcode & IBV_WC_RECV`).
pub const IBV_WC_RECV: ibv_wc_opcode = 1 << 7;
pub const IBV_WC_RECV_RDMA_WITH_IMM: ibv_wc_opcode = IBV_WC_RECV + 1;

/// `ibv_wc::wc_flags` bits.
pub const IBV_WC_GRH: c_uint = 1 << 0;
pub const IBV_WC_WITH_IMM: c_uint = 1 << 1;
pub const IBV_WC_WITH_INV: c_uint = 1 << 3;

/// `ibv_reg_mr` access flags.
pub const IBV_ACCESS_LOCAL_WRITE: c_uint = 1;
pub const IBV_ACCESS_REMOTE_WRITE: c_uint = 1 << 1;
pub const IBV_ACCESS_REMOTE_READ: c_uint = 1 << 2;
pub const IBV_ACCESS_REMOTE_ATOMIC: c_uint = 1 << 3;
pub const IBV_ACCESS_RELAXED_ORDERING: c_uint = 1 << 20;
/// Flags that only `ibv_reg_mr_iova2` understands (verbs.h routes them there).
pub const IBV_ACCESS_OPTIONAL_RANGE: c_uint = 0x3ff0_0000;

pub const IBV_WR_RDMA_WRITE: ibv_wr_opcode = 0;
pub const IBV_WR_RDMA_WRITE_WITH_IMM: ibv_wr_opcode = 1;
pub const IBV_WR_SEND: ibv_wr_opcode = 2;
pub const IBV_WR_SEND_WITH_IMM: ibv_wr_opcode = 3;
pub const IBV_WR_RDMA_READ: ibv_wr_opcode = 4;

/// `ibv_send_wr::send_flags` bits.
pub const IBV_SEND_FENCE: c_uint = 1 << 0;
pub const IBV_SEND_SIGNALED: c_uint = 1 << 1;
pub const IBV_SEND_SOLICITED: c_uint = 1 << 2;
pub const IBV_SEND_INLINE: c_uint = 1 << 3;

pub const IBV_QPT_RC: ibv_qp_type = 2;
pub const IBV_QPT_UC: ibv_qp_type = 3;
pub const IBV_QPT_UD: ibv_qp_type = 4;

pub const IBV_QPS_RESET: ibv_qp_state = 0;
pub const IBV_QPS_INIT: ibv_qp_state = 1;
pub const IBV_QPS_RTR: ibv_qp_state = 2;
pub const IBV_QPS_RTS: ibv_qp_state = 3;
pub const IBV_QPS_SQD: ibv_qp_state = 4;
pub const IBV_QPS_SQE: ibv_qp_state = 5;
pub const IBV_QPS_ERR: ibv_qp_state = 6;

/// `ibv_modify_qp` attribute mask bits (`enum ibv_qp_attr_mask`).
pub const IBV_QP_STATE: c_int = 1 << 0;
pub const IBV_QP_CUR_STATE: c_int = 1 << 1;
pub const IBV_QP_ACCESS_FLAGS: c_int = 1 << 3;
pub const IBV_QP_PKEY_INDEX: c_int = 1 << 4;
pub const IBV_QP_PORT: c_int = 1 << 5;
pub const IBV_QP_QKEY: c_int = 1 << 6;
pub const IBV_QP_AV: c_int = 1 << 7;
pub const IBV_QP_PATH_MTU: c_int = 1 << 8;
pub const IBV_QP_TIMEOUT: c_int = 1 << 9;
pub const IBV_QP_RETRY_CNT: c_int = 1 << 10;
pub const IBV_QP_RNR_RETRY: c_int = 1 << 11;
pub const IBV_QP_RQ_PSN: c_int = 1 << 12;
pub const IBV_QP_MAX_QP_RD_ATOMIC: c_int = 1 << 13;
pub const IBV_QP_MIN_RNR_TIMER: c_int = 1 << 15;
pub const IBV_QP_SQ_PSN: c_int = 1 << 16;
pub const IBV_QP_MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
pub const IBV_QP_CAP: c_int = 1 << 19;
pub const IBV_QP_DEST_QPN: c_int = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Structs.

/// Obsolete device ops kept for ABI (`struct _ibv_device_ops`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct _ibv_device_ops {
    pub _dummy1: *const c_void,
    pub _dummy2: *const c_void,
}

/// An RDMA device as listed by `ibv_get_device_list` (read-only for us).
#[repr(C)]
pub struct ibv_device {
    pub _ops: _ibv_device_ops,
    pub node_type: ibv_node_type,
    pub transport_type: ibv_transport_type,
    /// Kernel IB device name, e.g. "mlx5_0".
    pub name: [c_char; IBV_SYSFS_NAME_MAX],
    /// uverbs device name, e.g. "uverbs0".
    pub dev_name: [c_char; IBV_SYSFS_NAME_MAX],
    pub dev_path: [c_char; IBV_SYSFS_PATH_MAX],
    pub ibdev_path: [c_char; IBV_SYSFS_PATH_MAX],
}

pub type PollCqFn =
    unsafe extern "C" fn(cq: *mut ibv_cq, num_entries: c_int, wc: *mut ibv_wc) -> c_int;
pub type ReqNotifyCqFn = unsafe extern "C" fn(cq: *mut ibv_cq, solicited_only: c_int) -> c_int;
pub type PostSendFn = unsafe extern "C" fn(
    qp: *mut ibv_qp,
    wr: *mut ibv_send_wr,
    bad_wr: *mut *mut ibv_send_wr,
) -> c_int;
pub type PostRecvFn = unsafe extern "C" fn(
    qp: *mut ibv_qp,
    wr: *mut ibv_recv_wr,
    bad_wr: *mut *mut ibv_recv_wr,
) -> c_int;
pub type PostSrqRecvFn = unsafe extern "C" fn(
    srq: *mut ibv_srq,
    wr: *mut ibv_recv_wr,
    bad_wr: *mut *mut ibv_recv_wr,
) -> c_int;

/// The provider's data-path entry points (`struct ibv_context_ops`), filled by the driver when
/// the device is opened. The `_compat_*` slots are kept only for their position.
#[repr(C)]
pub struct ibv_context_ops {
    pub _compat_query_device: *const c_void,
    pub _compat_query_port: *const c_void,
    pub _compat_alloc_pd: *const c_void,
    pub _compat_dealloc_pd: *const c_void,
    pub _compat_reg_mr: *const c_void,
    pub _compat_rereg_mr: *const c_void,
    pub _compat_dereg_mr: *const c_void,
    pub alloc_mw: Option<unsafe extern "C" fn(pd: *mut ibv_pd, ty: ibv_mw_type) -> *mut ibv_mw>,
    pub bind_mw: Option<
        unsafe extern "C" fn(qp: *mut ibv_qp, mw: *mut ibv_mw, bind: *mut ibv_mw_bind) -> c_int,
    >,
    pub dealloc_mw: Option<unsafe extern "C" fn(mw: *mut ibv_mw) -> c_int>,
    pub _compat_create_cq: *const c_void,
    pub poll_cq: Option<PollCqFn>,
    pub req_notify_cq: Option<ReqNotifyCqFn>,
    pub _compat_cq_event: *const c_void,
    pub _compat_resize_cq: *const c_void,
    pub _compat_destroy_cq: *const c_void,
    pub _compat_create_srq: *const c_void,
    pub _compat_modify_srq: *const c_void,
    pub _compat_query_srq: *const c_void,
    pub _compat_destroy_srq: *const c_void,
    pub post_srq_recv: Option<PostSrqRecvFn>,
    pub _compat_create_qp: *const c_void,
    pub _compat_query_qp: *const c_void,
    pub _compat_modify_qp: *const c_void,
    pub _compat_destroy_qp: *const c_void,
    pub post_send: Option<PostSendFn>,
    pub post_recv: Option<PostRecvFn>,
    pub _compat_create_ah: *const c_void,
    pub _compat_destroy_ah: *const c_void,
    pub _compat_attach_mcast: *const c_void,
    pub _compat_detach_mcast: *const c_void,
    pub _compat_async_event: *const c_void,
}

/// An opened device (`ibv_open_device`, or `rdma_cm_id::verbs`).
#[repr(C)]
pub struct ibv_context {
    pub device: *mut ibv_device,
    pub ops: ibv_context_ops,
    pub cmd_fd: c_int,
    pub async_fd: c_int,
    pub num_comp_vectors: c_int,
    pub mutex: libc::pthread_mutex_t,
    pub abi_compat: *mut c_void,
}

/// Protection domain.
#[repr(C)]
pub struct ibv_pd {
    pub context: *mut ibv_context,
    pub handle: u32,
}

/// Registered memory region; `lkey` goes into local SGEs, `rkey` to the peer.
#[repr(C)]
pub struct ibv_mr {
    pub context: *mut ibv_context,
    pub pd: *mut ibv_pd,
    pub addr: *mut c_void,
    pub length: usize,
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
}

/// Completion event channel (its `fd` can be polled).
#[repr(C)]
pub struct ibv_comp_channel {
    pub context: *mut ibv_context,
    pub fd: c_int,
    pub refcnt: c_int,
}

/// Completion queue.
#[repr(C)]
pub struct ibv_cq {
    pub context: *mut ibv_context,
    pub channel: *mut ibv_comp_channel,
    pub cq_context: *mut c_void,
    pub handle: u32,
    pub cqe: c_int,
    pub mutex: libc::pthread_mutex_t,
    pub cond: libc::pthread_cond_t,
    pub comp_events_completed: u32,
    pub async_events_completed: u32,
}

/// Queue pair.
#[repr(C)]
pub struct ibv_qp {
    pub context: *mut ibv_context,
    pub qp_context: *mut c_void,
    pub pd: *mut ibv_pd,
    pub send_cq: *mut ibv_cq,
    pub recv_cq: *mut ibv_cq,
    pub srq: *mut ibv_srq,
    pub handle: u32,
    pub qp_num: u32,
    pub state: ibv_qp_state,
    pub qp_type: ibv_qp_type,
    pub mutex: libc::pthread_mutex_t,
    pub cond: libc::pthread_cond_t,
    pub events_completed: u32,
}

/// `ibv_gid::global`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ibv_gid_global {
    /// Big-endian.
    pub subnet_prefix: u64,
    /// Big-endian.
    pub interface_id: u64,
}

/// A 16-byte GID (IB) or IPv6-mapped address (RoCE).
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_gid {
    pub raw: [u8; 16],
    pub global: ibv_gid_global,
}

/// Port properties (`ibv_query_port`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_port_attr {
    pub state: ibv_port_state,
    pub max_mtu: ibv_mtu,
    pub active_mtu: ibv_mtu,
    pub gid_tbl_len: c_int,
    pub port_cap_flags: u32,
    pub max_msg_sz: u32,
    pub bad_pkey_cntr: u32,
    pub qkey_viol_cntr: u32,
    pub pkey_tbl_len: u16,
    pub lid: u16,
    pub sm_lid: u16,
    pub lmc: u8,
    pub max_vl_num: u8,
    pub sm_sl: u8,
    pub subnet_timeout: u8,
    pub init_type_reply: u8,
    pub active_width: u8,
    pub active_speed: u8,
    pub phys_state: u8,
    /// `IBV_LINK_LAYER_*`.
    pub link_layer: u8,
    pub flags: u8,
    pub port_cap_flags2: u16,
}

/// A work completion.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ibv_wc {
    pub wr_id: u64,
    pub status: ibv_wc_status,
    pub opcode: ibv_wc_opcode,
    pub vendor_err: u32,
    pub byte_len: u32,
    /// C: `union { __be32 imm_data; uint32_t invalidated_rkey; }`. With `IBV_WC_WITH_IMM`
    /// the immediate in network byte order (`u32::from_be`), with `IBV_WC_WITH_INV` the
    /// invalidated rkey.
    pub imm_data: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: c_uint,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}

/// Scatter/gather element.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ibv_sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// `ibv_send_wr::wr.rdma`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ibv_send_wr_rdma {
    pub remote_addr: u64,
    pub rkey: u32,
}

/// `ibv_send_wr::wr.atomic`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ibv_send_wr_atomic {
    pub remote_addr: u64,
    pub compare_add: u64,
    pub swap: u64,
    pub rkey: u32,
}

/// `ibv_send_wr::wr.ud`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_send_wr_ud {
    pub ah: *mut ibv_ah,
    pub remote_qpn: u32,
    pub remote_qkey: u32,
}

/// `ibv_send_wr::wr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_send_wr_wr {
    pub rdma: ibv_send_wr_rdma,
    pub atomic: ibv_send_wr_atomic,
    pub ud: ibv_send_wr_ud,
}

/// `ibv_send_wr::qp_type.xrc`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ibv_send_wr_xrc {
    pub remote_srqn: u32,
}

/// `ibv_send_wr::qp_type`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_send_wr_qp_type {
    pub xrc: ibv_send_wr_xrc,
}

/// `struct ibv_mw_bind_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_mw_bind_info {
    pub mr: *mut ibv_mr,
    pub addr: u64,
    pub length: u64,
    pub mw_access_flags: c_uint,
}

/// `ibv_send_wr::bind_mw`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_send_wr_bind_mw {
    pub mw: *mut ibv_mw,
    pub rkey: u32,
    pub bind_info: ibv_mw_bind_info,
}

/// `ibv_send_wr::tso`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_send_wr_tso {
    pub hdr: *mut c_void,
    pub hdr_sz: u16,
    pub mss: u16,
}

/// The last, anonymous union of `ibv_send_wr` (`bind_mw` / `tso`).
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_send_wr_bind_mw_tso {
    pub bind_mw: ibv_send_wr_bind_mw,
    pub tso: ibv_send_wr_tso,
}

/// A send-queue work request. For RDMA WRITE_WITH_IMM: `opcode = IBV_WR_RDMA_WRITE_WITH_IMM`,
/// `imm_data = imm.to_be()`, `wr.rdma = { remote_addr, rkey }`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_send_wr {
    pub wr_id: u64,
    pub next: *mut ibv_send_wr,
    pub sg_list: *mut ibv_sge,
    pub num_sge: c_int,
    pub opcode: ibv_wr_opcode,
    pub send_flags: c_uint,
    /// C: `union { __be32 imm_data; uint32_t invalidate_rkey; }` (network byte order).
    pub imm_data: u32,
    pub wr: ibv_send_wr_wr,
    pub qp_type: ibv_send_wr_qp_type,
    pub bind_mw_tso: ibv_send_wr_bind_mw_tso,
}

/// A receive-queue work request.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_recv_wr {
    pub wr_id: u64,
    pub next: *mut ibv_recv_wr,
    pub sg_list: *mut ibv_sge,
    pub num_sge: c_int,
}

/// Queue-pair capacities.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ibv_qp_cap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// `ibv_create_qp` / `rdma_create_qp` attributes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_qp_init_attr {
    pub qp_context: *mut c_void,
    pub send_cq: *mut ibv_cq,
    pub recv_cq: *mut ibv_cq,
    pub srq: *mut ibv_srq,
    pub cap: ibv_qp_cap,
    pub qp_type: ibv_qp_type,
    pub sq_sig_all: c_int,
}

/// `struct ibv_global_route`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_global_route {
    pub dgid: ibv_gid,
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
}

/// Address vector (`struct ibv_ah_attr`), used in `ibv_qp_attr` and `rdma_ud_param`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_ah_attr {
    pub grh: ibv_global_route,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
}

/// `ibv_modify_qp` attributes (for moving a QP through INIT/RTR/RTS without rdma_cm).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_qp_attr {
    pub qp_state: ibv_qp_state,
    pub cur_qp_state: ibv_qp_state,
    pub path_mtu: ibv_mtu,
    pub path_mig_state: ibv_mig_state,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: c_uint,
    pub cap: ibv_qp_cap,
    pub ah_attr: ibv_ah_attr,
    pub alt_ah_attr: ibv_ah_attr,
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
    pub rate_limit: u32,
}

zeroed_default!(
    ibv_gid,
    ibv_port_attr,
    ibv_wc,
    ibv_send_wr,
    ibv_recv_wr,
    ibv_qp_init_attr,
    ibv_global_route,
    ibv_ah_attr,
    ibv_qp_attr,
);

impl ibv_wc {
    /// The immediate data in host byte order, when the completion carries one.
    pub fn imm(&self) -> Option<u32> {
        (self.wc_flags & IBV_WC_WITH_IMM != 0).then(|| u32::from_be(self.imm_data))
    }
}

impl ibv_send_wr {
    /// A plain RDMA WRITE of `sg_list[..num_sge]` to `remote_addr`/`rkey` (no immediate: the
    /// responder consumes no receive and writes no completion). `next` is null.
    pub fn rdma_write(
        wr_id: u64,
        sg_list: *mut ibv_sge,
        num_sge: c_int,
        remote_addr: u64,
        rkey: u32,
        send_flags: c_uint,
    ) -> Self {
        ibv_send_wr {
            wr_id,
            sg_list,
            num_sge,
            opcode: IBV_WR_RDMA_WRITE,
            send_flags,
            wr: ibv_send_wr_wr {
                rdma: ibv_send_wr_rdma { remote_addr, rkey },
            },
            ..Default::default()
        }
    }

    /// An RDMA WRITE_WITH_IMM of `sg_list[..num_sge]` to `remote_addr`/`rkey`; `imm` is in host
    /// byte order (stored big-endian, as verbs.h requires). `next` is null.
    pub fn rdma_write_with_imm(
        wr_id: u64,
        sg_list: *mut ibv_sge,
        num_sge: c_int,
        remote_addr: u64,
        rkey: u32,
        imm: u32,
        send_flags: c_uint,
    ) -> Self {
        ibv_send_wr {
            wr_id,
            sg_list,
            num_sge,
            opcode: IBV_WR_RDMA_WRITE_WITH_IMM,
            send_flags,
            imm_data: imm.to_be(),
            wr: ibv_send_wr_wr {
                rdma: ibv_send_wr_rdma { remote_addr, rkey },
            },
            ..Default::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// `strerror` text for `errno`, without the "(os error N)" suffix std adds.
pub(crate) fn errno_text(errno: i32) -> String {
    let mut buf = [0 as c_char; 256];
    // SAFETY: buf is writable for its length; the XSI strerror_r (what libc binds on Linux)
    // writes a NUL-terminated message into it and returns 0 on success.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return format!("unknown error {errno}");
    }
    // SAFETY: strerror_r succeeded, so buf holds a NUL-terminated string.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A libibverbs call failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VerbsError {
    /// A call returned NULL or a non-zero status; `errno` is what it reported.
    #[error("{call}: {text} (errno {errno})")]
    Call {
        call: &'static str,
        errno: i32,
        text: String,
    },
    /// `ibv_post_send`/`ibv_post_recv` rejected the list at work request `bad_wr_id` (that one
    /// and the ones after it were not posted).
    #[error("{call}: work request {bad_wr_id:?} rejected: {text} (errno {errno})")]
    Post {
        call: &'static str,
        errno: i32,
        text: String,
        bad_wr_id: Option<u64>,
    },
    /// An optional entry point this libibverbs does not export.
    #[error("{symbol} is not exported by this libibverbs (needs symbol version {version}, rdma-core >= {rdma_core})")]
    Unsupported {
        symbol: &'static str,
        version: &'static str,
        rdma_core: &'static str,
    },
}

impl VerbsError {
    /// From errno as the failed call left it.
    pub fn last(call: &'static str) -> Self {
        Self::from_errno(call, last_errno())
    }

    pub fn from_errno(call: &'static str, errno: i32) -> Self {
        VerbsError::Call {
            call,
            errno,
            text: errno_text(errno),
        }
    }

    /// The errno, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            VerbsError::Call { errno, .. } | VerbsError::Post { errno, .. } => Some(*errno),
            VerbsError::Unsupported { .. } => None,
        }
    }
}

/// An errno-style status (0 = success; providers return the errno itself, a few return -1 and
/// set errno).
fn status_errno(rc: c_int) -> i32 {
    if rc > 0 {
        rc
    } else {
        match last_errno() {
            0 => libc::EIO,
            e => e,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The loaded library.

pub type IbvGetDeviceListFn = unsafe extern "C" fn(num_devices: *mut c_int) -> *mut *mut ibv_device;
pub type IbvFreeDeviceListFn = unsafe extern "C" fn(list: *mut *mut ibv_device);
pub type IbvGetDeviceNameFn = unsafe extern "C" fn(device: *mut ibv_device) -> *const c_char;
pub type IbvOpenDeviceFn = unsafe extern "C" fn(device: *mut ibv_device) -> *mut ibv_context;
pub type IbvCloseDeviceFn = unsafe extern "C" fn(context: *mut ibv_context) -> c_int;
pub type IbvQueryPortFn = unsafe extern "C" fn(
    context: *mut ibv_context,
    port_num: u8,
    port_attr: *mut ibv_port_attr,
) -> c_int;
pub type IbvQueryGidFn = unsafe extern "C" fn(
    context: *mut ibv_context,
    port_num: u8,
    index: c_int,
    gid: *mut ibv_gid,
) -> c_int;
pub type IbvAllocPdFn = unsafe extern "C" fn(context: *mut ibv_context) -> *mut ibv_pd;
pub type IbvDeallocPdFn = unsafe extern "C" fn(pd: *mut ibv_pd) -> c_int;
pub type IbvRegMrFn = unsafe extern "C" fn(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    access: c_int,
) -> *mut ibv_mr;
pub type IbvRegMrIova2Fn = unsafe extern "C" fn(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: c_uint,
) -> *mut ibv_mr;
pub type IbvRegDmabufMrFn = unsafe extern "C" fn(
    pd: *mut ibv_pd,
    offset: u64,
    length: usize,
    iova: u64,
    fd: c_int,
    access: c_int,
) -> *mut ibv_mr;
pub type IbvDeregMrFn = unsafe extern "C" fn(mr: *mut ibv_mr) -> c_int;
pub type IbvCreateCompChannelFn =
    unsafe extern "C" fn(context: *mut ibv_context) -> *mut ibv_comp_channel;
pub type IbvDestroyCompChannelFn = unsafe extern "C" fn(channel: *mut ibv_comp_channel) -> c_int;
pub type IbvCreateCqFn = unsafe extern "C" fn(
    context: *mut ibv_context,
    cqe: c_int,
    cq_context: *mut c_void,
    channel: *mut ibv_comp_channel,
    comp_vector: c_int,
) -> *mut ibv_cq;
pub type IbvDestroyCqFn = unsafe extern "C" fn(cq: *mut ibv_cq) -> c_int;
pub type IbvGetCqEventFn = unsafe extern "C" fn(
    channel: *mut ibv_comp_channel,
    cq: *mut *mut ibv_cq,
    cq_context: *mut *mut c_void,
) -> c_int;
pub type IbvAckCqEventsFn = unsafe extern "C" fn(cq: *mut ibv_cq, nevents: c_uint);
pub type IbvCreateQpFn =
    unsafe extern "C" fn(pd: *mut ibv_pd, qp_init_attr: *mut ibv_qp_init_attr) -> *mut ibv_qp;
pub type IbvModifyQpFn =
    unsafe extern "C" fn(qp: *mut ibv_qp, attr: *mut ibv_qp_attr, attr_mask: c_int) -> c_int;
pub type IbvDestroyQpFn = unsafe extern "C" fn(qp: *mut ibv_qp) -> c_int;
pub type IbvWcStatusStrFn = unsafe extern "C" fn(status: ibv_wc_status) -> *const c_char;
pub type IbvForkInitFn = unsafe extern "C" fn() -> c_int;

/// libibverbs' exported functions, resolved at run time. Each field is the C function of the
/// same name with its exact prototype; calling one is `unsafe` with the C API's contract.
///
/// `ibv_query_port` is the exported `IBVERBS_1.1` symbol (verbs.h wraps it in a macro that may
/// call the provider's extended `query_port` instead): it fills the port attributes up to
/// `link_layer`; `flags` and `port_cap_flags2` stay as passed (zero via
/// [`Verbs::query_port`]).
#[derive(Debug)]
pub struct Verbs {
    lib: Library,
    pub ibv_get_device_list: IbvGetDeviceListFn,
    pub ibv_free_device_list: IbvFreeDeviceListFn,
    pub ibv_get_device_name: IbvGetDeviceNameFn,
    pub ibv_open_device: IbvOpenDeviceFn,
    pub ibv_close_device: IbvCloseDeviceFn,
    pub ibv_query_port: IbvQueryPortFn,
    pub ibv_query_gid: IbvQueryGidFn,
    pub ibv_alloc_pd: IbvAllocPdFn,
    pub ibv_dealloc_pd: IbvDeallocPdFn,
    /// The exported `ibv_reg_mr@IBVERBS_1.1` (in verbs.h `ibv_reg_mr` is a macro that picks it
    /// or `ibv_reg_mr_iova2`; [`Verbs::reg_mr`] does the same).
    pub ibv_reg_mr: IbvRegMrFn,
    /// `IBVERBS_1.8` (rdma-core >= 29); `None` on older libraries.
    pub ibv_reg_mr_iova2: Option<IbvRegMrIova2Fn>,
    /// `IBVERBS_1.12` (rdma-core >= 34); `None` on older libraries.
    pub ibv_reg_dmabuf_mr: Option<IbvRegDmabufMrFn>,
    pub ibv_dereg_mr: IbvDeregMrFn,
    pub ibv_create_comp_channel: IbvCreateCompChannelFn,
    pub ibv_destroy_comp_channel: IbvDestroyCompChannelFn,
    pub ibv_create_cq: IbvCreateCqFn,
    pub ibv_destroy_cq: IbvDestroyCqFn,
    pub ibv_get_cq_event: IbvGetCqEventFn,
    pub ibv_ack_cq_events: IbvAckCqEventsFn,
    pub ibv_create_qp: IbvCreateQpFn,
    pub ibv_modify_qp: IbvModifyQpFn,
    pub ibv_destroy_qp: IbvDestroyQpFn,
    pub ibv_wc_status_str: IbvWcStatusStrFn,
    pub ibv_fork_init: IbvForkInitFn,
}

/// Ports tried per device by [`Verbs::device_ports`] (HCAs have one or two).
const MAX_PORTS_PROBED: u8 = 8;

/// One port's attributes as `--check` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortAttributes {
    pub port_num: u8,
    /// `IBV_PORT_*`.
    pub state: ibv_port_state,
    /// `IBV_MTU_*`.
    pub active_mtu: ibv_mtu,
    /// `IBV_LINK_LAYER_*`.
    pub link_layer: u8,
}

/// An RDMA device and its ports (or why they could not be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePorts {
    pub name: String,
    pub ports: Result<Vec<PortAttributes>, VerbsError>,
}

const IBVERBS_1_0: Option<&str> = Some("IBVERBS_1.0");
const IBVERBS_1_1: Option<&str> = Some("IBVERBS_1.1");

static VERBS: OnceLock<Result<Verbs, DlError>> = OnceLock::new();

impl Verbs {
    /// Loads libibverbs once per process (later calls return the same result).
    pub fn load() -> Result<&'static Verbs, DlError> {
        VERBS
            .get_or_init(|| Verbs::load_from(LIBIBVERBS_SONAMES))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Opens the first of `sonames` and resolves every symbol (not cached; [`Verbs::load`] is
    /// this with [`LIBIBVERBS_SONAMES`], once).
    pub fn load_from(sonames: &[&'static str]) -> Result<Verbs, DlError> {
        let lib = Library::open(sonames, LIBIBVERBS_PACKAGE)?;
        // SAFETY: each type alias above is the exact C prototype from rdma-core's verbs.h of the
        // symbol resolved into it, at the symbol version whose ABI that prototype describes.
        unsafe {
            Ok(Verbs {
                ibv_get_device_list: lib.sym("ibv_get_device_list", IBVERBS_1_1)?,
                ibv_free_device_list: lib.sym("ibv_free_device_list", IBVERBS_1_1)?,
                ibv_get_device_name: lib.sym("ibv_get_device_name", IBVERBS_1_1)?,
                ibv_open_device: lib.sym("ibv_open_device", IBVERBS_1_1)?,
                ibv_close_device: lib.sym("ibv_close_device", IBVERBS_1_1)?,
                ibv_query_port: lib.sym("ibv_query_port", IBVERBS_1_1)?,
                ibv_query_gid: lib.sym("ibv_query_gid", IBVERBS_1_1)?,
                ibv_alloc_pd: lib.sym("ibv_alloc_pd", IBVERBS_1_1)?,
                ibv_dealloc_pd: lib.sym("ibv_dealloc_pd", IBVERBS_1_1)?,
                ibv_reg_mr: lib.sym("ibv_reg_mr", IBVERBS_1_1)?,
                ibv_reg_mr_iova2: lib.sym_opt("ibv_reg_mr_iova2", Some("IBVERBS_1.8")),
                ibv_reg_dmabuf_mr: lib.sym_opt("ibv_reg_dmabuf_mr", Some("IBVERBS_1.12")),
                ibv_dereg_mr: lib.sym("ibv_dereg_mr", IBVERBS_1_1)?,
                ibv_create_comp_channel: lib.sym("ibv_create_comp_channel", IBVERBS_1_0)?,
                ibv_destroy_comp_channel: lib.sym("ibv_destroy_comp_channel", IBVERBS_1_0)?,
                ibv_create_cq: lib.sym("ibv_create_cq", IBVERBS_1_1)?,
                ibv_destroy_cq: lib.sym("ibv_destroy_cq", IBVERBS_1_1)?,
                ibv_get_cq_event: lib.sym("ibv_get_cq_event", IBVERBS_1_1)?,
                ibv_ack_cq_events: lib.sym("ibv_ack_cq_events", IBVERBS_1_1)?,
                ibv_create_qp: lib.sym("ibv_create_qp", IBVERBS_1_1)?,
                ibv_modify_qp: lib.sym("ibv_modify_qp", IBVERBS_1_1)?,
                ibv_destroy_qp: lib.sym("ibv_destroy_qp", IBVERBS_1_1)?,
                ibv_wc_status_str: lib.sym("ibv_wc_status_str", IBVERBS_1_1)?,
                ibv_fork_init: lib.sym("ibv_fork_init", IBVERBS_1_1)?,
                lib,
            })
        }
    }

    /// The soname that was opened.
    pub fn library(&self) -> &'static str {
        self.lib.soname()
    }

    /// Names of the RDMA devices present (empty when there are none).
    pub fn device_names(&self) -> Result<Vec<String>, VerbsError> {
        self.each_device(|name, _| name)
    }

    /// Each RDMA device with its ports, as `--check` reports them: the device is opened and
    /// ports 1, 2, ... are queried until one is refused (verbs has no port count without
    /// `ibv_query_device`; a port past the last answers EINVAL).
    pub fn device_ports(&self) -> Result<Vec<DevicePorts>, VerbsError> {
        self.each_device(|name, dev| {
            // SAFETY: dev is a live entry of the device list each_device holds open.
            let context = unsafe { (self.ibv_open_device)(dev) };
            if context.is_null() {
                let err = VerbsError::last("ibv_open_device");
                return DevicePorts {
                    name,
                    ports: Err(err),
                };
            }
            let mut ports = Vec::new();
            let mut first_error = None;
            for port_num in 1..=MAX_PORTS_PROBED {
                // SAFETY: context was opened above and is closed only after this loop.
                match unsafe { self.query_port(context, port_num) } {
                    Ok(attr) => ports.push(PortAttributes {
                        port_num,
                        state: attr.state,
                        active_mtu: attr.active_mtu,
                        link_layer: attr.link_layer,
                    }),
                    Err(e) => {
                        first_error = Some(e);
                        break;
                    }
                }
            }
            // SAFETY: context came from ibv_open_device and is closed exactly once; nothing
            // made from it outlives this call.
            unsafe { (self.ibv_close_device)(context) };
            let ports = match (ports.is_empty(), first_error) {
                (true, Some(e)) => Err(e),
                _ => Ok(ports),
            };
            DevicePorts { name, ports }
        })
    }

    /// Calls `f(name, device)` for every device of one `ibv_get_device_list` (freed after).
    fn each_device<T>(
        &self,
        mut f: impl FnMut(String, *mut ibv_device) -> T,
    ) -> Result<Vec<T>, VerbsError> {
        let mut n: c_int = 0;
        // SAFETY: n is a live int; the result is null or a NULL-terminated array of n devices
        // that stays valid until ibv_free_device_list.
        let list = unsafe { (self.ibv_get_device_list)(&mut n) };
        if list.is_null() {
            let err = VerbsError::last("ibv_get_device_list");
            return Err(match err.errno() {
                // rdma-core's answer when /sys/class/infiniband_verbs is missing.
                Some(libc::ENOSYS) => VerbsError::Call {
                    call: "ibv_get_device_list",
                    errno: libc::ENOSYS,
                    text: "the kernel has no RDMA verbs support (ib_uverbs not loaded?)".into(),
                },
                _ => err,
            });
        }
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for i in 0..n.max(0) as usize {
            // SAFETY: i < n, so list[i] is a valid device; ibv_get_device_name returns a
            // NUL-terminated string inside it (or null), copied before the list is freed.
            let (dev, name) = unsafe {
                let dev = *list.add(i);
                if dev.is_null() {
                    break;
                }
                let name = (self.ibv_get_device_name)(dev);
                let name = if name.is_null() {
                    format!("device {i}")
                } else {
                    CStr::from_ptr(name).to_string_lossy().into_owned()
                };
                (dev, name)
            };
            out.push(f(name, dev));
        }
        // SAFETY: list came from ibv_get_device_list and is freed exactly once; f kept no
        // device pointer (it gets them only for the length of its call).
        unsafe { (self.ibv_free_device_list)(list) };
        Ok(out)
    }

    /// `ibv_wc_status_str`: a text for any status value ("unknown" for ones it doesn't know).
    pub fn wc_status_str(&self, status: ibv_wc_status) -> String {
        // SAFETY: takes any enum value and returns a static NUL-terminated string.
        let p = unsafe { (self.ibv_wc_status_str)(status) };
        if p.is_null() {
            return format!("status {status}");
        }
        // SAFETY: non-null static C string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// `ibv_query_port` into a zeroed `ibv_port_attr`.
    ///
    /// # Safety
    /// `context` must be a live context from `ibv_open_device` (or `rdma_cm_id::verbs`).
    pub unsafe fn query_port(
        &self,
        context: *mut ibv_context,
        port_num: u8,
    ) -> Result<ibv_port_attr, VerbsError> {
        let mut attr = ibv_port_attr::default();
        // SAFETY: the caller guarantees context; attr is a live, full-size ibv_port_attr, larger
        // than the prefix the exported symbol writes.
        let rc = unsafe { (self.ibv_query_port)(context, port_num, &mut attr) };
        if rc != 0 {
            return Err(VerbsError::from_errno("ibv_query_port", status_errno(rc)));
        }
        Ok(attr)
    }

    /// Registers `length` bytes at `addr`, as verbs.h's `ibv_reg_mr` macro does: through
    /// `ibv_reg_mr_iova2` when `access` has a flag of `IBV_ACCESS_OPTIONAL_RANGE` (e.g. relaxed
    /// ordering) and the library has it, else through `ibv_reg_mr`.
    ///
    /// # Safety
    /// `pd` must be a live protection domain and `addr..addr+length` memory that stays mapped
    /// until the region is deregistered (with `LOCAL_WRITE`/`REMOTE_WRITE` the NIC writes it).
    pub unsafe fn reg_mr(
        &self,
        pd: *mut ibv_pd,
        addr: *mut c_void,
        length: usize,
        access: c_uint,
    ) -> Result<NonNull<ibv_mr>, VerbsError> {
        let mr = match self.ibv_reg_mr_iova2 {
            // SAFETY: the caller's contract; iova = addr as the macro passes.
            Some(iova2) if access & IBV_ACCESS_OPTIONAL_RANGE != 0 => unsafe {
                iova2(pd, addr, length, addr as u64, access)
            },
            // SAFETY: the caller's contract.
            _ => unsafe { (self.ibv_reg_mr)(pd, addr, length, access as c_int) },
        };
        NonNull::new(mr).ok_or_else(|| VerbsError::last("ibv_reg_mr"))
    }

    /// `ibv_reg_dmabuf_mr` (GPU memory exported as a dma-buf), or
    /// [`VerbsError::Unsupported`] when this libibverbs predates it.
    ///
    /// # Safety
    /// `pd` must be a live protection domain and `fd` a dma-buf whose `offset..offset+length`
    /// stays valid until the region is deregistered.
    pub unsafe fn reg_dmabuf_mr(
        &self,
        pd: *mut ibv_pd,
        offset: u64,
        length: usize,
        iova: u64,
        fd: c_int,
        access: c_uint,
    ) -> Result<NonNull<ibv_mr>, VerbsError> {
        let f = self.ibv_reg_dmabuf_mr.ok_or(VerbsError::Unsupported {
            symbol: "ibv_reg_dmabuf_mr",
            version: "IBVERBS_1.12",
            rdma_core: "34",
        })?;
        // SAFETY: the caller's contract.
        let mr = unsafe { f(pd, offset, length, iova, fd, access as c_int) };
        NonNull::new(mr).ok_or_else(|| VerbsError::last("ibv_reg_dmabuf_mr"))
    }
}

// ---------------------------------------------------------------------------------------------
// The data path: static inline in verbs.h, through the provider's ops table.

/// The ops table of the context `obj_context` points to.
///
/// # Safety
/// `obj_context` must be a live context.
unsafe fn ops<'a>(obj_context: *mut ibv_context) -> &'a ibv_context_ops {
    // SAFETY: the caller guarantees the context is live; the provider fills ops at open time
    // and never changes it afterwards, so a shared reference is sound for the call.
    unsafe { &(*obj_context).ops }
}

fn missing_op(call: &'static str) -> VerbsError {
    VerbsError::from_errno(call, libc::EOPNOTSUPP)
}

/// `ibv_post_send(qp, wr, &bad_wr)`: posts the linked list starting at `wr`.
///
/// # Safety
/// `qp` must be a live queue pair; `wr` and every `next`/`sg_list` it reaches must be valid for
/// the call, and the memory the SGEs name must stay registered and untouched (for sends) until
/// the completion arrives.
pub unsafe fn post_send(qp: *mut ibv_qp, wr: &mut ibv_send_wr) -> Result<(), VerbsError> {
    // SAFETY: qp is live (caller), so qp->context is its live context.
    let f = unsafe { ops((*qp).context) }
        .post_send
        .ok_or_else(|| missing_op("ibv_post_send"))?;
    let mut bad: *mut ibv_send_wr = ptr::null_mut();
    // SAFETY: exactly what verbs.h's inline ibv_post_send does, with the caller's guarantees.
    let rc = unsafe { f(qp, wr, &mut bad) };
    if rc == 0 {
        return Ok(());
    }
    let errno = status_errno(rc);
    Err(VerbsError::Post {
        call: "ibv_post_send",
        errno,
        text: errno_text(errno),
        // SAFETY: on failure bad is null or points into the caller's (still valid) list.
        bad_wr_id: unsafe { bad.as_ref() }.map(|w| w.wr_id),
    })
}

/// `ibv_post_recv(qp, wr, &bad_wr)`: posts the linked list starting at `wr`.
///
/// # Safety
/// `qp` must be a live queue pair; `wr` and every `next`/`sg_list` it reaches must be valid for
/// the call, and the SGEs' memory must stay registered until the completion arrives.
pub unsafe fn post_recv(qp: *mut ibv_qp, wr: &mut ibv_recv_wr) -> Result<(), VerbsError> {
    // SAFETY: qp is live (caller), so qp->context is its live context.
    let f = unsafe { ops((*qp).context) }
        .post_recv
        .ok_or_else(|| missing_op("ibv_post_recv"))?;
    let mut bad: *mut ibv_recv_wr = ptr::null_mut();
    // SAFETY: exactly what verbs.h's inline ibv_post_recv does, with the caller's guarantees.
    let rc = unsafe { f(qp, wr, &mut bad) };
    if rc == 0 {
        return Ok(());
    }
    let errno = status_errno(rc);
    Err(VerbsError::Post {
        call: "ibv_post_recv",
        errno,
        text: errno_text(errno),
        // SAFETY: on failure bad is null or points into the caller's (still valid) list.
        bad_wr_id: unsafe { bad.as_ref() }.map(|w| w.wr_id),
    })
}

/// `ibv_poll_cq`: fills the front of `wc` with completions; returns how many (0 = none).
///
/// # Safety
/// `cq` must be a live completion queue, polled by one thread at a time.
pub unsafe fn poll_cq(cq: *mut ibv_cq, wc: &mut [ibv_wc]) -> Result<usize, VerbsError> {
    // SAFETY: cq is live (caller), so cq->context is its live context.
    let f = unsafe { ops((*cq).context) }
        .poll_cq
        .ok_or_else(|| missing_op("ibv_poll_cq"))?;
    let n = wc.len().min(c_int::MAX as usize) as c_int;
    // SAFETY: wc is writable for n entries; cq per the caller.
    let rc = unsafe { f(cq, n, wc.as_mut_ptr()) };
    if rc < 0 {
        // Providers return a negative value without a meaningful errno.
        return Err(VerbsError::from_errno("ibv_poll_cq", libc::EIO));
    }
    Ok(rc as usize)
}

/// `ibv_req_notify_cq`: arms the CQ's completion channel for the next (solicited) completion.
///
/// # Safety
/// `cq` must be a live completion queue created with a completion channel.
pub unsafe fn req_notify_cq(cq: *mut ibv_cq, solicited_only: bool) -> Result<(), VerbsError> {
    // SAFETY: cq is live (caller), so cq->context is its live context.
    let f = unsafe { ops((*cq).context) }
        .req_notify_cq
        .ok_or_else(|| missing_op("ibv_req_notify_cq"))?;
    // SAFETY: what verbs.h's inline ibv_req_notify_cq does.
    let rc = unsafe { f(cq, solicited_only as c_int) };
    if rc != 0 {
        return Err(VerbsError::from_errno(
            "ibv_req_notify_cq",
            status_errno(rc),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn missing_library_error_names_it() {
        let err = Verbs::load_from(&["libibverbs-hacserve-missing.so.1"]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(
                "libibverbs-hacserve-missing.so.1 not found (is rdma-core installed?)"
            ),
            "{text}"
        );
        assert!(matches!(err, DlError::NotFound { .. }));
    }

    /// With rdma-core installed: dlopen, every symbol resolves, and real calls work. On a
    /// machine without RDMA devices the list is empty (or the kernel lacks uverbs: ENOSYS).
    #[test]
    fn loads_libibverbs_and_lists_devices() {
        let verbs = match Verbs::load() {
            Ok(v) => v,
            Err(e) => {
                eprintln!("SKIPPED: {e} (apt-get install rdma-core ibverbs-providers)");
                return;
            }
        };
        assert_eq!(verbs.library(), "libibverbs.so.1");
        assert_eq!(verbs.wc_status_str(IBV_WC_SUCCESS), "success");
        assert_eq!(
            verbs.wc_status_str(IBV_WC_RETRY_EXC_ERR),
            "transport retry counter exceeded"
        );
        match verbs.device_names() {
            Ok(names) => eprintln!("libibverbs devices: {names:?}"),
            Err(e) => {
                eprintln!("ibv_get_device_list: {e}");
                assert_eq!(e.errno(), Some(libc::ENOSYS), "{e}");
            }
        }
        assert!(verbs.ibv_reg_mr_iova2.is_some());
        // Same process, same result.
        assert!(std::ptr::eq(verbs, Verbs::load().unwrap()));
    }

    #[test]
    fn unsupported_dmabuf_is_an_error_when_called() {
        let e = VerbsError::Unsupported {
            symbol: "ibv_reg_dmabuf_mr",
            version: "IBVERBS_1.12",
            rdma_core: "34",
        };
        assert!(e.to_string().contains("ibv_reg_dmabuf_mr is not exported"));
        assert_eq!(e.errno(), None);
    }

    #[test]
    fn write_with_imm_request_is_big_endian() {
        let mut sge = ibv_sge {
            addr: 0x1000,
            length: 64,
            lkey: 7,
        };
        let wr = ibv_send_wr::rdma_write_with_imm(
            9,
            &mut sge,
            1,
            0xdead_0000,
            42,
            0x0102_0304,
            IBV_SEND_SIGNALED,
        );
        assert_eq!(wr.imm_data.to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(wr.opcode, IBV_WR_RDMA_WRITE_WITH_IMM);
        // SAFETY: the rdma member was the one written.
        let rdma = unsafe { wr.wr.rdma };
        assert_eq!((rdma.remote_addr, rdma.rkey), (0xdead_0000, 42));
        assert!(wr.next.is_null());
        let wc = ibv_wc {
            imm_data: 0x0102_0304u32.to_be(),
            wc_flags: IBV_WC_WITH_IMM,
            ..Default::default()
        };
        assert_eq!(wc.imm(), Some(0x0102_0304));
        assert_eq!(ibv_wc::default().imm(), None);
        // The ops table's post_send is where verbs.h says (x86-64).
        assert_eq!(offset_of!(ibv_context_ops, post_send), 25 * 8);
        assert_eq!(size_of::<ibv_wc>(), 48);
    }

    #[test]
    fn errno_text_has_no_suffix() {
        assert_eq!(errno_text(libc::ENOMEM), "Cannot allocate memory");
        let e = VerbsError::from_errno("ibv_alloc_pd", libc::ENOMEM);
        assert_eq!(
            e.to_string(),
            "ibv_alloc_pd: Cannot allocate memory (errno 12)"
        );
    }
}

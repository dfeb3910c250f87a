//! The hand-written verbs/rdma_cm mirrors against the real rdma-core headers.
//!
//! Generates a C program that includes `<infiniband/verbs.h>` and `<rdma/rdma_cma.h>` and prints
//! sizeof/alignof of every mirrored struct, offsetof and sizeof of every mirrored field, the
//! value of every mirrored constant, and whether each function prototype the bindings assume
//! is the header's (`__builtin_types_compatible_p`); compiles it with `cc` from PATH, runs it,
//! and compares with `size_of`/`align_of`/`offset_of!` and the Rust constants.
//!
//! Environment:
//! * `HACSERVE_VERBS_INCLUDE=DIR`: use the headers in `DIR` (`DIR/infiniband/verbs.h`,
//!   `DIR/rdma/rdma_cma.h`, e.g. a newer rdma-core build) instead of the system ones.
//! * `HACSERVE_REQUIRE_LAYOUT=1`: a missing header or compiler fails the test instead of
//!   skipping it (for CI, where libibverbs-dev and librdmacm-dev are installed).
//!
//! Without the headers the test prints `SKIPPED: ...` to stderr and returns.

// The field-size closures below need `unsafe` only when the path crosses a union.
#![allow(unused_unsafe)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use hacserve_ffi::rdma::sys::cm::*;
use hacserve_ffi::rdma::sys::verbs::*;

/// One number the C program prints and the Rust side must match.
struct Check {
    key: String,
    c_expr: String,
    rust: i128,
}

fn field_size<T, F>(_f: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect()
}

/// `size!(v, struct ibv_wc)`: sizeof and alignof.
macro_rules! size {
    ($v:ident, $kw:ident $t:ident) => {{
        let c = concat!(stringify!($kw), " ", stringify!($t));
        $v.push(Check {
            key: format!("sizeof({c})"),
            c_expr: format!("sizeof({c})"),
            rust: size_of::<$t>() as i128,
        });
        $v.push(Check {
            key: format!("alignof({c})"),
            c_expr: format!("_Alignof({c})"),
            rust: align_of::<$t>() as i128,
        });
    }};
}

/// `field!(v, struct ibv_wc, wr_id)`, or with the C member spelled differently from the Rust
/// path: `field!(v, struct ibv_wc, "invalidated_rkey" => imm_data)`. Checks offsetof and the
/// member's size.
macro_rules! field {
    ($v:ident, $kw:ident $t:ident, $($f:ident).+) => {
        field!($v, $kw $t, squash(stringify!($($f).+)) => $($f).+)
    };
    ($v:ident, $kw:ident $t:ident, $c:expr => $($f:ident).+) => {{
        let ty = concat!(stringify!($kw), " ", stringify!($t));
        let member: String = $c.to_string();
        $v.push(Check {
            key: format!("offsetof({ty}, {member})"),
            c_expr: format!("offsetof({ty}, {member})"),
            rust: offset_of!($t, $($f).+) as i128,
        });
        $v.push(Check {
            key: format!("sizeof({ty}.{member})"),
            c_expr: format!("sizeof((({ty} *)0)->{member})"),
            // SAFETY: never called; only its type is used.
            rust: field_size::<$t, _>(|s| unsafe { &s.$($f).+ }) as i128,
        });
    }};
}

/// Every listed field of one struct: `fields!(v, struct ibv_sge, addr, length, lkey)`.
macro_rules! fields {
    ($v:ident, $kw:ident $t:ident, $($f:ident),+ $(,)?) => {{
        size!($v, $kw $t);
        $( field!($v, $kw $t, $f); )+
    }};
}

/// Constants: `konst!(v, IBV_WC_SUCCESS, IBV_QPT_RC)`.
macro_rules! konst {
    ($v:ident, $($k:ident),+ $(,)?) => {{
        $( $v.push(Check {
            key: stringify!($k).to_string(),
            c_expr: format!("(long long)({})", stringify!($k)),
            rust: $k as i128,
        }); )+
    }};
}

/// The prototype the Rust binding was written from must be the header's: prints 1 when
/// `&(name)` (parenthesised, so function-like macros such as `ibv_reg_mr` are not expanded)
/// has the given C pointer type.
fn proto(v: &mut Vec<Check>, name: &str, c_fn_ptr_type: &str) {
    v.push(Check {
        key: format!("prototype {name}: {c_fn_ptr_type}"),
        c_expr: format!("__builtin_types_compatible_p(__typeof__(&({name})), {c_fn_ptr_type})"),
        rust: 1,
    });
}

/// Same for a function-pointer member of a struct (the ops table).
fn member_proto(v: &mut Vec<Check>, ty: &str, member: &str, c_fn_ptr_type: &str) {
    v.push(Check {
        key: format!("prototype {ty}.{member}: {c_fn_ptr_type}"),
        c_expr: format!(
            "__builtin_types_compatible_p(__typeof__((({ty} *)0)->{member}), {c_fn_ptr_type})"
        ),
        rust: 1,
    });
}

fn verbs_checks(v: &mut Vec<Check>) {
    fields!(v, struct _ibv_device_ops, _dummy1, _dummy2);
    fields!(
        v,
        struct ibv_device,
        _ops,
        node_type,
        transport_type,
        name,
        dev_name,
        dev_path,
        ibdev_path
    );
    fields!(
        v,
        struct ibv_context_ops,
        _compat_query_device,
        _compat_query_port,
        _compat_alloc_pd,
        _compat_dealloc_pd,
        _compat_reg_mr,
        _compat_rereg_mr,
        _compat_dereg_mr,
        alloc_mw,
        bind_mw,
        dealloc_mw,
        _compat_create_cq,
        poll_cq,
        req_notify_cq,
        _compat_cq_event,
        _compat_resize_cq,
        _compat_destroy_cq,
        _compat_create_srq,
        _compat_modify_srq,
        _compat_query_srq,
        _compat_destroy_srq,
        post_srq_recv,
        _compat_create_qp,
        _compat_query_qp,
        _compat_modify_qp,
        _compat_destroy_qp,
        post_send,
        post_recv,
        _compat_create_ah,
        _compat_destroy_ah,
        _compat_attach_mcast,
        _compat_detach_mcast,
        _compat_async_event,
    );
    fields!(
        v,
        struct ibv_context,
        device,
        ops,
        cmd_fd,
        async_fd,
        num_comp_vectors,
        mutex,
        abi_compat
    );
    // Where the inline ibv_post_send/ibv_post_recv/ibv_poll_cq/ibv_req_notify_cq read.
    field!(v, struct ibv_context, ops.post_send);
    field!(v, struct ibv_context, ops.post_recv);
    field!(v, struct ibv_context, ops.poll_cq);
    field!(v, struct ibv_context, ops.req_notify_cq);
    fields!(v, struct ibv_pd, context, handle);
    fields!(v, struct ibv_mr, context, pd, addr, length, handle, lkey, rkey);
    fields!(v, struct ibv_comp_channel, context, fd, refcnt);
    fields!(
        v,
        struct ibv_cq,
        context,
        channel,
        cq_context,
        handle,
        cqe,
        mutex,
        cond,
        comp_events_completed,
        async_events_completed
    );
    fields!(
        v,
        struct ibv_qp,
        context,
        qp_context,
        pd,
        send_cq,
        recv_cq,
        srq,
        handle,
        qp_num,
        state,
        qp_type,
        mutex,
        cond,
        events_completed
    );
    fields!(v, union ibv_gid, raw, global);
    field!(v, union ibv_gid, global.subnet_prefix);
    field!(v, union ibv_gid, global.interface_id);
    fields!(
        v,
        struct ibv_port_attr,
        state,
        max_mtu,
        active_mtu,
        gid_tbl_len,
        port_cap_flags,
        max_msg_sz,
        bad_pkey_cntr,
        qkey_viol_cntr,
        pkey_tbl_len,
        lid,
        sm_lid,
        lmc,
        max_vl_num,
        sm_sl,
        subnet_timeout,
        init_type_reply,
        active_width,
        active_speed,
        phys_state,
        link_layer,
        flags,
        port_cap_flags2
    );
    fields!(
        v,
        struct ibv_wc,
        wr_id,
        status,
        opcode,
        vendor_err,
        byte_len,
        imm_data,
        qp_num,
        src_qp,
        wc_flags,
        pkey_index,
        slid,
        sl,
        dlid_path_bits
    );
    field!(v, struct ibv_wc, "invalidated_rkey" => imm_data);
    fields!(v, struct ibv_sge, addr, length, lkey);
    fields!(
        v,
        struct ibv_send_wr,
        wr_id,
        next,
        sg_list,
        num_sge,
        opcode,
        send_flags,
        imm_data,
        wr,
        qp_type
    );
    field!(v, struct ibv_send_wr, "invalidate_rkey" => imm_data);
    field!(v, struct ibv_send_wr, wr.rdma);
    field!(v, struct ibv_send_wr, wr.rdma.remote_addr);
    field!(v, struct ibv_send_wr, wr.rdma.rkey);
    field!(v, struct ibv_send_wr, wr.atomic);
    field!(v, struct ibv_send_wr, wr.atomic.remote_addr);
    field!(v, struct ibv_send_wr, wr.atomic.compare_add);
    field!(v, struct ibv_send_wr, wr.atomic.swap);
    field!(v, struct ibv_send_wr, wr.atomic.rkey);
    field!(v, struct ibv_send_wr, wr.ud);
    field!(v, struct ibv_send_wr, wr.ud.ah);
    field!(v, struct ibv_send_wr, wr.ud.remote_qpn);
    field!(v, struct ibv_send_wr, wr.ud.remote_qkey);
    field!(v, struct ibv_send_wr, qp_type.xrc.remote_srqn);
    field!(v, struct ibv_send_wr, "bind_mw" => bind_mw_tso.bind_mw);
    field!(v, struct ibv_send_wr, "bind_mw.mw" => bind_mw_tso.bind_mw.mw);
    field!(v, struct ibv_send_wr, "bind_mw.rkey" => bind_mw_tso.bind_mw.rkey);
    field!(v, struct ibv_send_wr, "bind_mw.bind_info" => bind_mw_tso.bind_mw.bind_info);
    field!(v, struct ibv_send_wr, "tso" => bind_mw_tso.tso);
    field!(v, struct ibv_send_wr, "tso.hdr" => bind_mw_tso.tso.hdr);
    field!(v, struct ibv_send_wr, "tso.hdr_sz" => bind_mw_tso.tso.hdr_sz);
    field!(v, struct ibv_send_wr, "tso.mss" => bind_mw_tso.tso.mss);
    fields!(
        v,
        struct ibv_mw_bind_info,
        mr,
        addr,
        length,
        mw_access_flags
    );
    fields!(v, struct ibv_recv_wr, wr_id, next, sg_list, num_sge);
    fields!(
        v,
        struct ibv_qp_cap,
        max_send_wr,
        max_recv_wr,
        max_send_sge,
        max_recv_sge,
        max_inline_data
    );
    fields!(
        v,
        struct ibv_qp_init_attr,
        qp_context,
        send_cq,
        recv_cq,
        srq,
        cap,
        qp_type,
        sq_sig_all
    );
    fields!(
        v,
        struct ibv_global_route,
        dgid,
        flow_label,
        sgid_index,
        hop_limit,
        traffic_class
    );
    fields!(
        v,
        struct ibv_ah_attr,
        grh,
        dlid,
        sl,
        src_path_bits,
        static_rate,
        is_global,
        port_num
    );
    fields!(
        v,
        struct ibv_qp_attr,
        qp_state,
        cur_qp_state,
        path_mtu,
        path_mig_state,
        qkey,
        rq_psn,
        sq_psn,
        dest_qp_num,
        qp_access_flags,
        cap,
        ah_attr,
        alt_ah_attr,
        pkey_index,
        alt_pkey_index,
        en_sqd_async_notify,
        sq_draining,
        max_rd_atomic,
        max_dest_rd_atomic,
        min_rnr_timer,
        port_num,
        timeout,
        retry_cnt,
        rnr_retry,
        alt_port_num,
        alt_timeout,
        rate_limit
    );

    konst!(
        v,
        IBV_SYSFS_NAME_MAX,
        IBV_SYSFS_PATH_MAX,
        IBV_MTU_256,
        IBV_MTU_512,
        IBV_MTU_1024,
        IBV_MTU_2048,
        IBV_MTU_4096,
        IBV_PORT_NOP,
        IBV_PORT_DOWN,
        IBV_PORT_INIT,
        IBV_PORT_ARMED,
        IBV_PORT_ACTIVE,
        IBV_PORT_ACTIVE_DEFER,
        IBV_LINK_LAYER_UNSPECIFIED,
        IBV_LINK_LAYER_INFINIBAND,
        IBV_LINK_LAYER_ETHERNET,
        IBV_WC_SUCCESS,
        IBV_WC_LOC_LEN_ERR,
        IBV_WC_LOC_QP_OP_ERR,
        IBV_WC_LOC_EEC_OP_ERR,
        IBV_WC_LOC_PROT_ERR,
        IBV_WC_WR_FLUSH_ERR,
        IBV_WC_MW_BIND_ERR,
        IBV_WC_BAD_RESP_ERR,
        IBV_WC_LOC_ACCESS_ERR,
        IBV_WC_REM_INV_REQ_ERR,
        IBV_WC_REM_ACCESS_ERR,
        IBV_WC_REM_OP_ERR,
        IBV_WC_RETRY_EXC_ERR,
        IBV_WC_RNR_RETRY_EXC_ERR,
        IBV_WC_LOC_RDD_VIOL_ERR,
        IBV_WC_REM_INV_RD_REQ_ERR,
        IBV_WC_REM_ABORT_ERR,
        IBV_WC_INV_EECN_ERR,
        IBV_WC_INV_EEC_STATE_ERR,
        IBV_WC_FATAL_ERR,
        IBV_WC_RESP_TIMEOUT_ERR,
        IBV_WC_GENERAL_ERR,
        IBV_WC_SEND,
        IBV_WC_RDMA_WRITE,
        IBV_WC_RDMA_READ,
        IBV_WC_RECV,
        IBV_WC_RECV_RDMA_WITH_IMM,
        IBV_WC_GRH,
        IBV_WC_WITH_IMM,
        IBV_WC_WITH_INV,
        IBV_ACCESS_LOCAL_WRITE,
        IBV_ACCESS_REMOTE_WRITE,
        IBV_ACCESS_REMOTE_READ,
        IBV_ACCESS_REMOTE_ATOMIC,
        IBV_ACCESS_RELAXED_ORDERING,
        IBV_ACCESS_OPTIONAL_RANGE,
        IBV_WR_RDMA_WRITE,
        IBV_WR_RDMA_WRITE_WITH_IMM,
        IBV_WR_SEND,
        IBV_WR_SEND_WITH_IMM,
        IBV_WR_RDMA_READ,
        IBV_SEND_FENCE,
        IBV_SEND_SIGNALED,
        IBV_SEND_SOLICITED,
        IBV_SEND_INLINE,
        IBV_QPT_RC,
        IBV_QPT_UC,
        IBV_QPT_UD,
        IBV_QPS_RESET,
        IBV_QPS_INIT,
        IBV_QPS_RTR,
        IBV_QPS_RTS,
        IBV_QPS_SQD,
        IBV_QPS_SQE,
        IBV_QPS_ERR,
        IBV_QP_STATE,
        IBV_QP_CUR_STATE,
        IBV_QP_ACCESS_FLAGS,
        IBV_QP_PKEY_INDEX,
        IBV_QP_PORT,
        IBV_QP_QKEY,
        IBV_QP_AV,
        IBV_QP_PATH_MTU,
        IBV_QP_TIMEOUT,
        IBV_QP_RETRY_CNT,
        IBV_QP_RNR_RETRY,
        IBV_QP_RQ_PSN,
        IBV_QP_MAX_QP_RD_ATOMIC,
        IBV_QP_MIN_RNR_TIMER,
        IBV_QP_SQ_PSN,
        IBV_QP_MAX_DEST_RD_ATOMIC,
        IBV_QP_CAP,
        IBV_QP_DEST_QPN,
    );

    for (name, ty) in [
        ("ibv_get_device_list", "struct ibv_device **(*)(int *)"),
        ("ibv_free_device_list", "void (*)(struct ibv_device **)"),
        (
            "ibv_get_device_name",
            "const char *(*)(struct ibv_device *)",
        ),
        (
            "ibv_open_device",
            "struct ibv_context *(*)(struct ibv_device *)",
        ),
        ("ibv_close_device", "int (*)(struct ibv_context *)"),
        // The exported symbol writes the _compat prefix of struct ibv_port_attr.
        (
            "ibv_query_port",
            "int (*)(struct ibv_context *, uint8_t, struct _compat_ibv_port_attr *)",
        ),
        (
            "ibv_query_gid",
            "int (*)(struct ibv_context *, uint8_t, int, union ibv_gid *)",
        ),
        ("ibv_alloc_pd", "struct ibv_pd *(*)(struct ibv_context *)"),
        ("ibv_dealloc_pd", "int (*)(struct ibv_pd *)"),
        (
            "ibv_reg_mr",
            "struct ibv_mr *(*)(struct ibv_pd *, void *, size_t, int)",
        ),
        (
            "ibv_reg_mr_iova2",
            "struct ibv_mr *(*)(struct ibv_pd *, void *, size_t, uint64_t, unsigned int)",
        ),
        (
            "ibv_reg_dmabuf_mr",
            "struct ibv_mr *(*)(struct ibv_pd *, uint64_t, size_t, uint64_t, int, int)",
        ),
        ("ibv_dereg_mr", "int (*)(struct ibv_mr *)"),
        (
            "ibv_create_comp_channel",
            "struct ibv_comp_channel *(*)(struct ibv_context *)",
        ),
        (
            "ibv_destroy_comp_channel",
            "int (*)(struct ibv_comp_channel *)",
        ),
        (
            "ibv_create_cq",
            "struct ibv_cq *(*)(struct ibv_context *, int, void *, struct ibv_comp_channel *, int)",
        ),
        ("ibv_destroy_cq", "int (*)(struct ibv_cq *)"),
        (
            "ibv_get_cq_event",
            "int (*)(struct ibv_comp_channel *, struct ibv_cq **, void **)",
        ),
        (
            "ibv_ack_cq_events",
            "void (*)(struct ibv_cq *, unsigned int)",
        ),
        (
            "ibv_create_qp",
            "struct ibv_qp *(*)(struct ibv_pd *, struct ibv_qp_init_attr *)",
        ),
        (
            "ibv_modify_qp",
            "int (*)(struct ibv_qp *, struct ibv_qp_attr *, int)",
        ),
        ("ibv_destroy_qp", "int (*)(struct ibv_qp *)"),
        ("ibv_wc_status_str", "const char *(*)(enum ibv_wc_status)"),
        ("ibv_fork_init", "int (*)(void)"),
    ] {
        proto(v, name, ty);
    }
    for (member, ty) in [
        ("poll_cq", "int (*)(struct ibv_cq *, int, struct ibv_wc *)"),
        ("req_notify_cq", "int (*)(struct ibv_cq *, int)"),
        (
            "post_send",
            "int (*)(struct ibv_qp *, struct ibv_send_wr *, struct ibv_send_wr **)",
        ),
        (
            "post_recv",
            "int (*)(struct ibv_qp *, struct ibv_recv_wr *, struct ibv_recv_wr **)",
        ),
        (
            "post_srq_recv",
            "int (*)(struct ibv_srq *, struct ibv_recv_wr *, struct ibv_recv_wr **)",
        ),
    ] {
        member_proto(v, "struct ibv_context_ops", member, ty);
    }
}

fn rdmacm_checks(v: &mut Vec<Check>) {
    fields!(v, struct rdma_event_channel, fd);
    fields!(v, struct rdma_ib_addr, sgid, dgid, pkey);
    size!(v, struct rdma_addr);
    for side in ["src", "dst"] {
        let base = if side == "src" {
            offset_of!(rdma_addr, src)
        } else {
            offset_of!(rdma_addr, dst)
        };
        for (c_suffix, rust_off, rust_size) in [
            (
                "addr",
                offset_of!(rdma_sockaddr, addr),
                size_of::<libc::sockaddr>(),
            ),
            (
                "sin",
                offset_of!(rdma_sockaddr, sin),
                size_of::<libc::sockaddr_in>(),
            ),
            (
                "sin6",
                offset_of!(rdma_sockaddr, sin6),
                size_of::<libc::sockaddr_in6>(),
            ),
            (
                "storage",
                offset_of!(rdma_sockaddr, storage),
                size_of::<libc::sockaddr_storage>(),
            ),
        ] {
            let member = format!("{side}_{c_suffix}");
            v.push(Check {
                key: format!("offsetof(struct rdma_addr, {member})"),
                c_expr: format!("offsetof(struct rdma_addr, {member})"),
                rust: (base + rust_off) as i128,
            });
            v.push(Check {
                key: format!("sizeof(struct rdma_addr.{member})"),
                c_expr: format!("sizeof(((struct rdma_addr *)0)->{member})"),
                rust: rust_size as i128,
            });
        }
    }
    field!(v, struct rdma_addr, addr);
    field!(v, struct rdma_addr, addr.ibaddr);
    field!(v, struct rdma_addr, addr.ibaddr.pkey);
    fields!(v, struct rdma_route, addr, path_rec, num_paths);
    fields!(
        v,
        struct rdma_cm_id,
        verbs,
        channel,
        context,
        qp,
        route,
        ps,
        port_num,
        event,
        send_cq_channel,
        send_cq,
        recv_cq_channel,
        recv_cq,
        srq,
        pd,
        qp_type
    );
    field!(v, struct rdma_cm_id, "route.addr.src_addr" => route.addr.src.addr);
    field!(v, struct rdma_cm_id, "route.addr.dst_addr" => route.addr.dst.addr);
    fields!(
        v,
        struct rdma_conn_param,
        private_data,
        private_data_len,
        responder_resources,
        initiator_depth,
        flow_control,
        retry_count,
        rnr_retry_count,
        srq,
        qp_num
    );
    fields!(
        v,
        struct rdma_ud_param,
        private_data,
        private_data_len,
        ah_attr,
        qp_num,
        qkey
    );
    fields!(v, struct rdma_cm_event, id, listen_id, event, status, param);
    field!(v, struct rdma_cm_event, param.conn);
    field!(v, struct rdma_cm_event, param.conn.private_data);
    field!(v, struct rdma_cm_event, param.conn.private_data_len);
    field!(v, struct rdma_cm_event, param.ud);
    field!(v, struct rdma_cm_event, param.ud.qp_num);

    konst!(
        v,
        RDMA_CM_EVENT_ADDR_RESOLVED,
        RDMA_CM_EVENT_ADDR_ERROR,
        RDMA_CM_EVENT_ROUTE_RESOLVED,
        RDMA_CM_EVENT_ROUTE_ERROR,
        RDMA_CM_EVENT_CONNECT_REQUEST,
        RDMA_CM_EVENT_CONNECT_RESPONSE,
        RDMA_CM_EVENT_CONNECT_ERROR,
        RDMA_CM_EVENT_UNREACHABLE,
        RDMA_CM_EVENT_REJECTED,
        RDMA_CM_EVENT_ESTABLISHED,
        RDMA_CM_EVENT_DISCONNECTED,
        RDMA_CM_EVENT_DEVICE_REMOVAL,
        RDMA_CM_EVENT_MULTICAST_JOIN,
        RDMA_CM_EVENT_MULTICAST_ERROR,
        RDMA_CM_EVENT_ADDR_CHANGE,
        RDMA_CM_EVENT_TIMEWAIT_EXIT,
        RDMA_PS_IPOIB,
        RDMA_PS_TCP,
        RDMA_PS_UDP,
        RDMA_PS_IB,
        RDMA_MAX_RESP_RES,
        RDMA_MAX_INIT_DEPTH,
        RDMA_OPTION_ID,
        RDMA_OPTION_IB,
        RDMA_OPTION_ID_TOS,
        RDMA_OPTION_ID_REUSEADDR,
        RDMA_OPTION_ID_AFONLY,
        RDMA_OPTION_ID_ACK_TIMEOUT,
    );

    for (name, ty) in [
        ("rdma_create_event_channel", "struct rdma_event_channel *(*)(void)"),
        ("rdma_destroy_event_channel", "void (*)(struct rdma_event_channel *)"),
        (
            "rdma_create_id",
            "int (*)(struct rdma_event_channel *, struct rdma_cm_id **, void *, enum rdma_port_space)",
        ),
        ("rdma_destroy_id", "int (*)(struct rdma_cm_id *)"),
        ("rdma_bind_addr", "int (*)(struct rdma_cm_id *, struct sockaddr *)"),
        ("rdma_listen", "int (*)(struct rdma_cm_id *, int)"),
        (
            "rdma_resolve_addr",
            "int (*)(struct rdma_cm_id *, struct sockaddr *, struct sockaddr *, int)",
        ),
        ("rdma_resolve_route", "int (*)(struct rdma_cm_id *, int)"),
        (
            "rdma_get_cm_event",
            "int (*)(struct rdma_event_channel *, struct rdma_cm_event **)",
        ),
        ("rdma_ack_cm_event", "int (*)(struct rdma_cm_event *)"),
        (
            "rdma_connect",
            "int (*)(struct rdma_cm_id *, struct rdma_conn_param *)",
        ),
        (
            "rdma_accept",
            "int (*)(struct rdma_cm_id *, struct rdma_conn_param *)",
        ),
        (
            "rdma_reject",
            "int (*)(struct rdma_cm_id *, const void *, uint8_t)",
        ),
        ("rdma_disconnect", "int (*)(struct rdma_cm_id *)"),
        (
            "rdma_create_qp",
            "int (*)(struct rdma_cm_id *, struct ibv_pd *, struct ibv_qp_init_attr *)",
        ),
        ("rdma_destroy_qp", "void (*)(struct rdma_cm_id *)"),
        ("rdma_event_str", "const char *(*)(enum rdma_cm_event_type)"),
        (
            "rdma_set_option",
            "int (*)(struct rdma_cm_id *, int, int, void *, size_t)",
        ),
    ] {
        proto(v, name, ty);
    }
}

fn c_string_literal(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn c_program(checks: &[Check]) -> String {
    let mut src = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <stdint.h>\n\
         #include <infiniband/verbs.h>\n#include <rdma/rdma_cma.h>\n\n\
         int main(void) {\n",
    );
    for c in checks {
        writeln!(
            src,
            "    printf(\"%s\\t%lld\\n\", {}, (long long)({}));",
            c_string_literal(&c.key),
            c.c_expr
        )
        .unwrap();
    }
    src.push_str("    return 0;\n}\n");
    src
}

/// Why the comparison cannot run here (printed as SKIPPED, or a failure when required).
fn skip(reason: &str) {
    let msg = format!("SKIPPED: {reason}");
    if std::env::var_os("HACSERVE_REQUIRE_LAYOUT").is_some_and(|v| v != "0" && !v.is_empty()) {
        panic!("{msg} (HACSERVE_REQUIRE_LAYOUT is set)");
    }
    eprintln!("{msg}");
}

const MISSING: &str =
    "<infiniband/verbs.h> not found (apt-get install libibverbs-dev librdmacm-dev)";

/// `Some(extra cc args)` when the headers are usable, `None` (after printing SKIPPED) when not.
fn header_args(work: &Path) -> Option<Vec<String>> {
    if let Some(dir) = std::env::var_os("HACSERVE_VERBS_INCLUDE") {
        let dir = PathBuf::from(dir);
        for h in ["infiniband/verbs.h", "rdma/rdma_cma.h"] {
            if !dir.join(h).is_file() {
                skip(&format!(
                    "{MISSING}: no {} (HACSERVE_VERBS_INCLUDE={})",
                    dir.join(h).display(),
                    dir.display()
                ));
                return None;
            }
        }
        return Some(vec![format!("-I{}", dir.display())]);
    }
    // Probe the compiler's own search path.
    let probe = work.join("probe.c");
    std::fs::write(
        &probe,
        "#include <infiniband/verbs.h>\n#include <rdma/rdma_cma.h>\nint main(void) { return 0; }\n",
    )
    .unwrap();
    let out = match Command::new("cc").arg("-fsyntax-only").arg(&probe).output() {
        Ok(out) => out,
        Err(e) => {
            skip(&format!("cc not runnable ({e}); {MISSING}"));
            return None;
        }
    };
    if out.status.success() {
        return Some(Vec::new());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No such file or directory")
        && (stderr.contains("infiniband/verbs.h") || stderr.contains("rdma/rdma_cma.h"))
    {
        skip(&format!("{MISSING}\n{stderr}"));
        return None;
    }
    panic!("probing the rdma-core headers failed:\n{stderr}");
}

#[test]
fn mirrors_match_rdma_core_headers() {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hacserve-layout-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let Some(args) = header_args(&work) else {
        let _ = std::fs::remove_dir_all(&work);
        return;
    };

    let mut checks = Vec::new();
    verbs_checks(&mut checks);
    rdmacm_checks(&mut checks);

    let src = work.join("layout_check.c");
    let exe = work.join("layout_check");
    std::fs::write(&src, c_program(&checks)).unwrap();
    let out = Command::new("cc")
        .args(&args)
        .arg("-std=gnu11")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "compiling {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("run layout_check");
    assert!(run.status.success(), "{} failed", exe.display());
    let stdout = String::from_utf8(run.stdout).unwrap();
    let c_values: BTreeMap<&str, i128> = stdout
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k, v.parse().expect("a number")))
        .collect();

    let mut diff = String::new();
    for c in &checks {
        match c_values.get(c.key.as_str()) {
            Some(&cv) if cv == c.rust => {}
            Some(&cv) => writeln!(diff, "  {:<70} C {:>6}  Rust {:>6}", c.key, cv, c.rust).unwrap(),
            None => writeln!(diff, "  {:<70} missing from the C output", c.key).unwrap(),
        }
    }
    let count = |prefix: &str| checks.iter().filter(|c| c.key.starts_with(prefix)).count();
    eprintln!(
        "layout: {} checks against {}: {} sizeof+alignof pairs, {} field offsets (+ as many \
         field sizes), {} constants, {} prototypes",
        checks.len(),
        if args.is_empty() {
            "the system headers".to_string()
        } else {
            args.join(" ")
        },
        count("alignof("),
        count("offsetof("),
        checks
            .iter()
            .filter(|c| c
                .key
                .chars()
                .all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit() || ch == '_'))
            .count(),
        count("prototype "),
    );
    assert!(
        diff.is_empty(),
        "Rust mirrors differ from the rdma-core headers (C source kept at {}):\n{diff}",
        src.display()
    );
    let _ = std::fs::remove_dir_all(&work);
}

//! Typed values of the verbs API, the safe face of [`super::sys::verbs`]'s integer constants:
//! what a work completion says ([`WcStatus`], [`WcOpcode`], [`WorkCompletion`]), how memory
//! is registered ([`AccessFlags`]), and the QP and port states ([`QpState`], [`PortState`]).
//!
//! C enums can grow in a newer rdma-core, so every enum here has a catch-all variant holding
//! the raw value instead of being `#[repr]`-transmuted (which would be UB for an unknown
//! value). The raw values are the constants of `sys::verbs`, which `ffi/tests/layout.rs`
//! checks against `<infiniband/verbs.h>`; the unit tests below check each mapping both ways.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};

use super::sys::verbs as sys;

/// Defines a C-enum mirror: `from_raw` maps every listed constant to its variant and anything
/// else to the catch-all; `raw` gives the C value back.
macro_rules! c_enum {
    (
        $(#[$m:meta])* $name:ident($raw:ty), other = $other:ident {
            $($(#[$vm:meta])* $variant:ident = $c:path),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $variant,)*
            /// A value this build does not name (a newer library).
            $other($raw),
        }

        impl $name {
            /// The variant of a raw C value.
            pub fn from_raw(raw: $raw) -> Self {
                match raw {
                    $(v if v == $c => $name::$variant,)*
                    v => $name::$other(v),
                }
            }

            /// The raw C value.
            pub fn raw(self) -> $raw {
                match self {
                    $($name::$variant => $c,)*
                    $name::$other(v) => v,
                }
            }

            #[cfg(test)]
            const ALL: &'static [$name] = &[$($name::$variant),*];
        }
    };
}
pub(crate) use c_enum;

c_enum!(
    /// `enum ibv_wc_status`: how a work request ended.
    WcStatus(sys::ibv_wc_status), other = Unknown {
        Success = sys::IBV_WC_SUCCESS,
        LocLenErr = sys::IBV_WC_LOC_LEN_ERR,
        LocQpOpErr = sys::IBV_WC_LOC_QP_OP_ERR,
        LocEecOpErr = sys::IBV_WC_LOC_EEC_OP_ERR,
        LocProtErr = sys::IBV_WC_LOC_PROT_ERR,
        /// The QP went to the error state (a disconnect) before this request ran.
        WrFlushErr = sys::IBV_WC_WR_FLUSH_ERR,
        MwBindErr = sys::IBV_WC_MW_BIND_ERR,
        BadRespErr = sys::IBV_WC_BAD_RESP_ERR,
        LocAccessErr = sys::IBV_WC_LOC_ACCESS_ERR,
        RemInvReqErr = sys::IBV_WC_REM_INV_REQ_ERR,
        RemAccessErr = sys::IBV_WC_REM_ACCESS_ERR,
        RemOpErr = sys::IBV_WC_REM_OP_ERR,
        RetryExcErr = sys::IBV_WC_RETRY_EXC_ERR,
        RnrRetryExcErr = sys::IBV_WC_RNR_RETRY_EXC_ERR,
        LocRddViolErr = sys::IBV_WC_LOC_RDD_VIOL_ERR,
        RemInvRdReqErr = sys::IBV_WC_REM_INV_RD_REQ_ERR,
        RemAbortErr = sys::IBV_WC_REM_ABORT_ERR,
        InvEecnErr = sys::IBV_WC_INV_EECN_ERR,
        InvEecStateErr = sys::IBV_WC_INV_EEC_STATE_ERR,
        FatalErr = sys::IBV_WC_FATAL_ERR,
        RespTimeoutErr = sys::IBV_WC_RESP_TIMEOUT_ERR,
        GeneralErr = sys::IBV_WC_GENERAL_ERR,
    }
);

c_enum!(
    /// `enum ibv_wc_opcode`: what kind of work request completed.
    WcOpcode(sys::ibv_wc_opcode), other = Other {
        Send = sys::IBV_WC_SEND,
        RdmaWrite = sys::IBV_WC_RDMA_WRITE,
        RdmaRead = sys::IBV_WC_RDMA_READ,
        /// A receive consumed by a SEND.
        Recv = sys::IBV_WC_RECV,
        /// A receive consumed by an RDMA WRITE_WITH_IMM (the data went where the peer said).
        RecvRdmaWithImm = sys::IBV_WC_RECV_RDMA_WITH_IMM,
    }
);

c_enum!(
    /// `enum ibv_qp_state`.
    QpState(sys::ibv_qp_state), other = Other {
        Reset = sys::IBV_QPS_RESET,
        Init = sys::IBV_QPS_INIT,
        /// Ready to receive.
        Rtr = sys::IBV_QPS_RTR,
        /// Ready to send.
        Rts = sys::IBV_QPS_RTS,
        Sqd = sys::IBV_QPS_SQD,
        Sqe = sys::IBV_QPS_SQE,
        Err = sys::IBV_QPS_ERR,
    }
);

c_enum!(
    /// `enum ibv_port_state` (`ibv_port_attr::state`).
    PortState(sys::ibv_port_state), other = Other {
        Nop = sys::IBV_PORT_NOP,
        Down = sys::IBV_PORT_DOWN,
        Init = sys::IBV_PORT_INIT,
        Armed = sys::IBV_PORT_ARMED,
        Active = sys::IBV_PORT_ACTIVE,
        ActiveDefer = sys::IBV_PORT_ACTIVE_DEFER,
    }
);

/// `enum ibv_access_flags`: what a memory registration lets the NIC (and the peer) do.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AccessFlags(u32);

impl AccessFlags {
    /// No remote access; the NIC only reads (sends from the buffer).
    pub const NONE: AccessFlags = AccessFlags(0);
    /// The NIC may write the buffer (receives, and required with any remote write).
    pub const LOCAL_WRITE: AccessFlags = AccessFlags(sys::IBV_ACCESS_LOCAL_WRITE);
    /// The peer may RDMA WRITE into the buffer.
    pub const REMOTE_WRITE: AccessFlags = AccessFlags(sys::IBV_ACCESS_REMOTE_WRITE);
    /// The peer may RDMA READ the buffer.
    pub const REMOTE_READ: AccessFlags = AccessFlags(sys::IBV_ACCESS_REMOTE_READ);
    pub const REMOTE_ATOMIC: AccessFlags = AccessFlags(sys::IBV_ACCESS_REMOTE_ATOMIC);
    /// PCIe relaxed ordering (registered through `ibv_reg_mr_iova2` where available).
    pub const RELAXED_ORDERING: AccessFlags = AccessFlags(sys::IBV_ACCESS_RELAXED_ORDERING);

    /// The `IBV_ACCESS_*` bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: AccessFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for AccessFlags {
    type Output = AccessFlags;
    fn bitor(self, rhs: AccessFlags) -> AccessFlags {
        AccessFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for AccessFlags {
    fn bitor_assign(&mut self, rhs: AccessFlags) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for AccessFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(AccessFlags, &str); 5] = [
            (AccessFlags::LOCAL_WRITE, "LOCAL_WRITE"),
            (AccessFlags::REMOTE_WRITE, "REMOTE_WRITE"),
            (AccessFlags::REMOTE_READ, "REMOTE_READ"),
            (AccessFlags::REMOTE_ATOMIC, "REMOTE_ATOMIC"),
            (AccessFlags::RELAXED_ORDERING, "RELAXED_ORDERING"),
        ];
        let mut rest = self.0;
        let mut first = true;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                f.write_str(if first { "" } else { " | " })?;
                f.write_str(name)?;
                rest &= !flag.0;
                first = false;
            }
        }
        if rest != 0 || first {
            if !first {
                f.write_str(" | ")?;
            }
            write!(f, "{rest:#x}")?;
        }
        Ok(())
    }
}

/// One work completion, as polled from a completion queue: `struct ibv_wc` itself
/// (`repr(transparent)`, so the CQ is polled straight into it), read through typed accessors.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkCompletion(sys::ibv_wc);

impl WorkCompletion {
    /// The `wr_id` of the work request (or receive) that completed.
    pub fn wr_id(&self) -> u64 {
        self.0.wr_id
    }

    pub fn status(&self) -> WcStatus {
        WcStatus::from_raw(self.0.status)
    }

    /// Meaningful only when [`Self::status`] is [`WcStatus::Success`] (verbs.h).
    pub fn opcode(&self) -> WcOpcode {
        WcOpcode::from_raw(self.0.opcode)
    }

    /// Bytes received (receive completions).
    pub fn byte_len(&self) -> u32 {
        self.0.byte_len
    }

    /// The immediate data in host byte order, when the completion carries one.
    pub fn imm(&self) -> Option<u32> {
        self.0.imm()
    }

    /// A successful completion made without a NIC, by a ring source that stands in for one
    /// (the loopback GPU ring): a receive consumed by a WRITE_WITH_IMM carrying `imm`, or,
    /// with `imm` None, a signaled RDMA WRITE of ours that completed.
    pub fn stand_in(wr_id: u64, imm: Option<u32>) -> WorkCompletion {
        let (opcode, wc_flags, imm_data) = match imm {
            Some(imm) => (
                sys::IBV_WC_RECV_RDMA_WITH_IMM,
                sys::IBV_WC_WITH_IMM,
                imm.to_be(),
            ),
            None => (sys::IBV_WC_RDMA_WRITE, 0, 0),
        };
        WorkCompletion(sys::ibv_wc {
            wr_id,
            status: sys::IBV_WC_SUCCESS,
            opcode,
            wc_flags,
            imm_data,
            ..Default::default()
        })
    }

    /// The raw completion (for code inside ffi that hands it back to C).
    pub(crate) fn as_raw_slice_mut(wcs: &mut [WorkCompletion]) -> &mut [sys::ibv_wc] {
        // SAFETY: WorkCompletion is repr(transparent) over ibv_wc, so a slice of one is a
        // slice of the other with the same length and layout; every ibv_wc bit pattern is a
        // valid WorkCompletion.
        unsafe { std::slice::from_raw_parts_mut(wcs.as_mut_ptr().cast(), wcs.len()) }
    }
}

impl From<sys::ibv_wc> for WorkCompletion {
    fn from(wc: sys::ibv_wc) -> Self {
        WorkCompletion(wc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_map_every_constant_both_ways() {
        for &s in WcStatus::ALL {
            assert_eq!(WcStatus::from_raw(s.raw()), s);
        }
        assert_eq!(WcStatus::ALL.len(), 22);
        assert_eq!(WcStatus::from_raw(sys::IBV_WC_SUCCESS), WcStatus::Success);
        assert_eq!(
            WcStatus::from_raw(sys::IBV_WC_WR_FLUSH_ERR),
            WcStatus::WrFlushErr
        );
        assert_eq!(WcStatus::from_raw(99), WcStatus::Unknown(99));
        assert_eq!(WcStatus::Unknown(99).raw(), 99);
        for &o in WcOpcode::ALL {
            assert_eq!(WcOpcode::from_raw(o.raw()), o);
        }
        assert_eq!(WcOpcode::RecvRdmaWithImm.raw(), 129);
        assert_eq!(WcOpcode::from_raw(6), WcOpcode::Other(6));
        for &q in QpState::ALL {
            assert_eq!(QpState::from_raw(q.raw()), q);
        }
        assert_eq!(QpState::Rts.raw(), sys::IBV_QPS_RTS);
        for &p in PortState::ALL {
            assert_eq!(PortState::from_raw(p.raw()), p);
        }
        assert_eq!(PortState::from_raw(sys::IBV_PORT_ACTIVE), PortState::Active);
    }

    #[test]
    fn access_flags_are_the_c_bits() {
        let ring = AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE;
        assert_eq!(
            ring.bits(),
            sys::IBV_ACCESS_LOCAL_WRITE | sys::IBV_ACCESS_REMOTE_WRITE
        );
        assert!(ring.contains(AccessFlags::REMOTE_WRITE));
        assert!(!ring.contains(AccessFlags::REMOTE_READ));
        assert_eq!(format!("{ring:?}"), "LOCAL_WRITE | REMOTE_WRITE");
        assert_eq!(format!("{:?}", AccessFlags::NONE), "0x0");
        let mut a = AccessFlags::NONE;
        a |= AccessFlags::RELAXED_ORDERING;
        assert_eq!(a.bits() & sys::IBV_ACCESS_OPTIONAL_RANGE, a.bits());
    }

    #[test]
    fn work_completion_reads_the_raw_fields() {
        let wc = WorkCompletion::from(sys::ibv_wc {
            wr_id: 7,
            status: sys::IBV_WC_SUCCESS,
            opcode: sys::IBV_WC_RECV_RDMA_WITH_IMM,
            byte_len: 64,
            imm_data: 0x0102_0304u32.to_be(),
            wc_flags: sys::IBV_WC_WITH_IMM,
            ..Default::default()
        });
        assert_eq!(wc.wr_id(), 7);
        assert_eq!(wc.status(), WcStatus::Success);
        assert_eq!(wc.opcode(), WcOpcode::RecvRdmaWithImm);
        assert_eq!(wc.byte_len(), 64);
        assert_eq!(wc.imm(), Some(0x0102_0304));
        assert_eq!(WorkCompletion::default().imm(), None);
        let mut wcs = [wc; 2];
        assert_eq!(WorkCompletion::as_raw_slice_mut(&mut wcs)[1].wr_id, 7);
        assert_eq!(std::mem::size_of::<WorkCompletion>(), 48);
    }
}

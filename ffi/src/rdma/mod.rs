//! RDMA, layered like NCCL's net_ib over its `ibvwrap`: the raw rdma-core bindings in [`sys`]
//! (dlopen'ed function tables, C structs and constants), and the safe layer the transport
//! uses, which never hands out a raw integer from the C headers.
//!
//! * [`verbs`]: typed values of the verbs API (completion status and opcode, access flags,
//!   QP and port states) and [`WorkCompletion`].
//! * [`cm`]: rdma_cm event channel, ids and events ([`CmEventKind`]).
//! * [`conn`]: [`Rdma`] (both libraries loaded), [`RdmaError`], [`RcEndpoint`] (one RC
//!   connection's PD, CQ, QP and registered memory).
//! * [`mem`]: registered host and GPU buffers.
//! * [`probe`]: what a role's `--check` reports (libraries, devices, ports).
//! * [`ring`]: [`SlotRing`], fixed-size slots of a registered buffer lent out one token at
//!   a time, so the transport reads and writes ring memory without `unsafe`.

pub mod cm;
pub mod conn;
pub mod mem;
pub mod probe;
pub mod ring;
pub mod sys;
pub mod verbs;

pub use cm::{CmEvent, CmEventKind, CmId, EventChannel};
pub use conn::{EventWait, QpSizes, RcEndpoint, Rdma, RdmaError};
pub use mem::{HostBuf, PdShare, RegisteredBuf};
pub use ring::{RingError, RingMemory, SgeRange, SlotRing, SlotToken};
pub use verbs::{AccessFlags, WcOpcode, WcStatus, WorkCompletion};

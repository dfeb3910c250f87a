//! The contracts at the bottom of the runtime, below everything that uses them: what a
//! received request is ([`ServerJob`], and [`Queued`] once the serving core has validated
//! its header), how a reply goes back ([`ReplySink`]), what a transport offers the serving
//! core ([`ServerTransport`]) and a client ([`ClientTransport`]), the counters every
//! thread of a server updates, the process's payload-copy count ([`copies`]), and the poll modes with their one backoff rule.
//!
//! Nothing in here imports another runtime module except the wire format (`protocol`).

pub mod copies;
pub mod counters;
pub mod job;
pub mod poll;
pub mod refusal;
pub mod transport;

pub use counters::Counters;
pub use job::{Lent, LentReply, Queued, ReplySink, Resident, ServerJob};
pub use poll::{Backoff, PollMode, ServerPollMode};
pub use refusal::Refusal;
pub use transport::{ClientTransport, InLoop, ServerTransport, TransportError};

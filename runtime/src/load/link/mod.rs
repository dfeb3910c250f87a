//! What carries the load generator's requests: one [`LoadLink`] per connection. The driver
//! ([`super::driver`]) is written once over this trait; a transport is one file here
//! implementing it ([`zmq`], [`rdma`]) plus its arm in the CLI's `-a` match
//! (bins/cli/load.rs).

pub mod rdma;
pub mod zmq;

use super::LoadError;

/// One reply as a link hands it over.
pub enum Received<'a> {
    /// The whole message, lent until the next call on the link.
    Message(&'a [u8]),
    /// A message larger than the link's reply buffer: which request it answered is unknown.
    TooLarge,
}

/// One connection of the load generator, non-blocking both ways.
pub trait LoadLink: Send + Sized {
    /// What a thread needs to sleep on its links (ZeroMQ: poll items), made by each thread for itself.
    type Waiter;

    fn waiter(links: &[Self]) -> Self::Waiter;

    /// Hands `message` to the transport without blocking; false when it cannot take it now
    /// (a full queue, no credit). `index` names which of the connection's prepared requests
    /// it is: between two sends of the same index only the 32-byte header changes, which a
    /// link that keeps request bytes in registered slots may rely on.
    fn try_send(&mut self, index: usize, message: &[u8]) -> Result<bool, LoadError>;

    /// A reply, if one is waiting.
    fn try_recv(&mut self) -> Result<Option<Received<'_>>, LoadError>;

    /// Sleeps until a reply may be waiting on one of `links`, or about `timeout_ms`.
    fn wait(
        waiter: &mut Self::Waiter,
        links: &mut [Self],
        timeout_ms: i64,
    ) -> Result<(), LoadError>;

    /// The transport's name in tables and run.json.
    fn transport() -> &'static str;
}

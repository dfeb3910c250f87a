//! The load generator over RDMA: one [`RdmaClient`] per connection, requests written into its
//! registered send ring with WRITE_WITH_IMM, replies read in place from its response ring.
//! A slot keeps its bytes between uses, so a request that last went from the same slot is
//! resent by rewriting its 32-byte header only.

use std::time::Duration;

use super::{LoadLink, Received};
use crate::load::LoadError;
use crate::protocol::HEADER_LEN;
use crate::transport::rdma::{RdmaClient, RdmaClientConfig};

/// How long an idle thread sleeps between polls of its completion queues in block mode (the
/// rdma_client's own pause), and how many such sleeps pass between looks for a disconnect.
const IDLE_SLEEP: Duration = Duration::from_micros(20);
const DISCONNECT_CHECK_EVERY: u32 = 256;

pub struct RdmaLink {
    client: RdmaClient,
    /// Which prepared request each send slot holds (its payload stays there).
    slot_holds: Vec<Option<usize>>,
    idle: u32,
}

impl RdmaLink {
    pub fn connect(host: &str, port: u16, cfg: RdmaClientConfig) -> Result<RdmaLink, LoadError> {
        let depth = cfg.depth as usize;
        let client = RdmaClient::connect(host, port, cfg)?;
        Ok(RdmaLink {
            client,
            slot_holds: vec![None; depth],
            idle: 0,
        })
    }
}

impl LoadLink for RdmaLink {
    type Waiter = ();

    fn waiter(_links: &[Self]) {}

    fn try_send(&mut self, index: usize, message: &[u8]) -> Result<bool, LoadError> {
        // Slots go round-robin: the next one may still wait for its reply.
        if !self.client.can_send() {
            return Ok(false);
        }
        let slot = self.client.next_slot() as usize;
        let held = self.slot_holds.get(slot).copied().flatten();
        let bytes = self.client.next_send_slot()?;
        let Some(dst) = bytes.get_mut(..message.len()) else {
            return Err(LoadError::Config(format!(
                "a request of {} bytes does not fit the {}-byte RDMA slot",
                message.len(),
                bytes.len()
            )));
        };
        if held == Some(index) {
            dst[..HEADER_LEN].copy_from_slice(&message[..HEADER_LEN]);
        } else {
            dst.copy_from_slice(message);
        }
        if let Some(h) = self.slot_holds.get_mut(slot) {
            *h = Some(index);
        }
        self.client.send_prepared(message.len())?;
        Ok(true)
    }

    fn try_recv(&mut self) -> Result<Option<Received<'_>>, LoadError> {
        Ok(self
            .client
            .try_recv()?
            .map(|(_slot, bytes)| Received::Message(bytes)))
    }

    fn wait(_waiter: &mut (), links: &mut [Self], _timeout_ms: i64) -> Result<(), LoadError> {
        // A completion queue without a channel cannot be slept on: pause briefly, and now
        // and then look for a server that went away while nothing completes.
        std::thread::sleep(IDLE_SLEEP);
        for link in links {
            link.idle = link.idle.wrapping_add(1);
            if link.idle % DISCONNECT_CHECK_EVERY == 0 {
                link.client.poll_disconnect()?;
            }
        }
        Ok(())
    }

    fn transport() -> &'static str {
        "rdma"
    }
}

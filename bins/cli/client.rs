//! The clients' main body: zmq_client and rdma_client differ only in the transport (and
//! rdma_client's ring geometry and fault injection).

use anyhow::{bail, Context as _, Result};
use hacserve_runtime::client::{prepare_payload, report_run, run_closed_loop, ClientOptions};
use hacserve_runtime::contract::{ClientTransport, PollMode};
use hacserve_runtime::protocol::Task;

use super::ClientArgs;

impl ClientArgs {
    /// Logging, the stop handler and the poll mode of the reply wait.
    pub fn prepare(&self, poll_mode: &str) -> Result<PollMode> {
        super::init(self.debug);
        PollMode::parse(poll_mode, 1).map_err(anyhow::Error::msg)
    }

    /// The request payload: the image prepared for the task, or `--payload-size` zeros.
    pub fn payload(&self) -> Result<Vec<u8>> {
        if self.payload_size.is_some() && self.task != Task::Echo && self.task != Task::Sink {
            bail!("--payload-size applies to the echo and sink tasks (-t 3, -t 4) only");
        }
        let image = if self.payload_size.is_some() {
            Vec::new()
        } else {
            std::fs::read(&self.image)
                .with_context(|| format!("reading image {}", self.image.display()))?
        };
        prepare_payload(self.task, &image, self.payload_size)
            .with_context(|| format!("preparing the {} payload", self.task.name()))
    }

    /// Sends the closed-loop run over `transport`, prints the table (and with -s writes the
    /// logs); fails when the run stopped early.
    pub fn run<T: ClientTransport>(
        &self,
        role: &str,
        port: u16,
        transport: &mut T,
        payload: &[u8],
        max_reply: usize,
    ) -> Result<()> {
        let opts = ClientOptions {
            client_id: self.client_id,
            task: self.task,
            requests: self.requests,
            priority: self.priority,
            warmup: self.warmup,
            max_reply,
            debug: self.debug,
            reconnect_within: std::time::Duration::from_millis(self.reconnect_ms),
        };
        let run = run_closed_loop(transport, &opts, payload);
        let label = format!(
            "{role} {} -> {}:{port} task {} ({} B payload) model {}",
            self.client_id,
            self.host,
            self.task.name(),
            payload.len(),
            self.model_name
        );
        report_run(
            &run,
            &label,
            self.client_id,
            &self.classes_file,
            self.save_logs.then_some(self.folder.as_path()),
        )
        .context("writing the run's logs")?;
        if let Some(e) = run.failure {
            bail!(
                "run stopped after {} of {} requests: {e}",
                run.records.len(),
                self.requests
            );
        }
        Ok(())
    }
}

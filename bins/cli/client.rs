//! The clients' main body: zmq_client and rdma_client differ only in the transport (and
//! rdma_client's ring geometry and fault injection).

use anyhow::{bail, Context as _, Result};
use hacserve_runtime::client::{
    prepare_payloads, report_run, run_closed_loop, ClientOptions, RequestPayload,
};
use hacserve_runtime::contract::{ClientTransport, PollMode};
use hacserve_runtime::protocol::{Task, Workload, HEADER_LEN};

use super::ClientArgs;

impl ClientArgs {
    /// Logging, the stop handler and the poll mode of the reply wait.
    pub fn prepare(&self, poll_mode: &str) -> Result<PollMode> {
        super::init(self.debug);
        PollMode::parse(poll_mode, 1).map_err(anyhow::Error::msg)
    }

    /// The request payloads: the image prepared for each task the workload sends (one, or
    /// a mixture's three), or `--payload-size` zeros.
    pub fn payloads(&self) -> Result<Vec<RequestPayload>> {
        let transport_only = matches!(
            self.task,
            Workload::Single(Task::Echo) | Workload::Single(Task::Sink)
        );
        if self.payload_size.is_some() && !transport_only {
            bail!("--payload-size applies to the echo and sink tasks (-t 6, -t 7) only");
        }
        let needs_image =
            self.payload_size.is_none() && self.task.tasks().iter().any(|t| *t != Task::Ping);
        let image = if needs_image {
            std::fs::read(&self.image)
                .with_context(|| format!("reading image {}", self.image.display()))?
        } else {
            Vec::new()
        };
        prepare_payloads(self.task, &image, self.payload_size)
            .with_context(|| format!("preparing the {} payload", self.task.name()))
    }

    /// The longest request message the payloads make (header included).
    pub fn longest_request(payloads: &[RequestPayload]) -> usize {
        HEADER_LEN + payloads.iter().map(|p| p.bytes.len()).max().unwrap_or(0)
    }

    /// Sends the closed-loop run over `transport`, prints the table (and with -s writes the
    /// logs); fails when the run stopped early.
    pub fn run<T: ClientTransport>(
        &self,
        role: &str,
        port: u16,
        transport: &mut T,
        payloads: &[RequestPayload],
        max_reply: usize,
    ) -> Result<()> {
        let opts = ClientOptions {
            client_id: self.client_id,
            logits: self.logits,
            requests: self.requests,
            priority: self.priority,
            warmup: self.warmup,
            max_reply,
            debug: self.debug,
            reconnect_within: std::time::Duration::from_millis(self.reconnect_ms),
        };
        let run = run_closed_loop(transport, &opts, payloads);
        let sizes: Vec<String> = payloads.iter().map(|p| p.bytes.len().to_string()).collect();
        let label = format!(
            "{role} {} -> {}:{port} task {} ({} B payload) model {}",
            self.client_id,
            self.host,
            self.task.name(),
            sizes.join("/"),
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

//! The servers' main body: zmq_server and rdma_server differ only in the transport they
//! build and a few words of their banner.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use hacserve_runtime::contract::{ServerPollMode, ServerTransport};
use hacserve_runtime::engine::registry::BackendChoice;
use hacserve_runtime::engine::BackendArgs;
use hacserve_runtime::labels::Labels;
use hacserve_runtime::pipeline::{Pipeline, MAX_IMAGE_PIXELS};
use hacserve_runtime::protocol::HEADER_LEN;
use hacserve_runtime::server::{LoopPolicy, ServerOptions, ServerThreads};

use super::results::run_info;
use super::{MetricsArgs, ServerArgs};

/// The inbound transport a role's name says (zmq_server: zmq, rdma_server: rdma).
pub fn transport_name(role: &str) -> &'static str {
    if role.starts_with("rdma") {
        "rdma"
    } else {
        "zmq"
    }
}

/// The choices made from the options before any transport exists.
pub struct Serving {
    pub backend: BackendChoice,
    pub mode: ServerPollMode,
}

impl ServerArgs {
    fn backend_args(&self) -> BackendArgs<'_> {
        BackendArgs {
            backend: &self.backend,
            precision: &self.precision,
            gpus: &self.gpus,
            decode: &self.decode,
            threads: self.threads,
            workers: self.workers,
            streams: self.streams,
            max_batch: self.max_batch,
            preferred_batch_sizes: &self.preferred_batch_sizes,
            overlap_batches: self.overlap_batches == "on",
        }
    }

    /// Logging, the stop handler, the backend and the poll mode; `None` after `--backend
    /// help` printed the registry's list (not an error).
    pub fn prepare(&self) -> Result<Option<Serving>> {
        super::init(self.debug);
        if !(1..=MAX_IMAGE_PIXELS).contains(&self.max_image_pixels) {
            bail!(
                "--max-image-pixels {} is outside 1..={MAX_IMAGE_PIXELS} (8192x8192, the decoders' cap)",
                self.max_image_pixels
            );
        }
        if !matches!(self.overlap_batches.as_str(), "on" | "off") {
            bail!(
                "--overlap-batches {:?}: use on or off",
                self.overlap_batches
            );
        }
        let backend = match BackendChoice::parse(&self.backend_args()) {
            Err(e) if e.is_help() => {
                println!("{e}");
                return Ok(None);
            }
            chosen => chosen?,
        };
        let mode =
            ServerPollMode::parse(&self.poll_mode, backend.workers).map_err(anyhow::Error::msg)?;
        Ok(Some(Serving { backend, mode }))
    }

    /// The serving core's options: the one place they are built from the command line.
    fn options(&self, s: &Serving, max_payload: usize) -> Result<ServerOptions> {
        let priority_clients = self.priority_clients != 0;
        let max_queued_bytes = self.max_queued_mib.saturating_mul(1 << 20);
        // One request of the largest size must always fit, or it could never be served.
        if max_queued_bytes < HEADER_LEN + max_payload {
            bail!(
                "--max-queued-mib {} is below one request of the largest payload ({max_payload} B): raise it or lower --max-payload",
                self.max_queued_mib
            );
        }
        Ok(ServerOptions {
            workers: s.backend.workers,
            max_payload,
            poll_mode: s.mode.receive,
            worker_poll_mode: s.mode.workers,
            queue_depth: self.queue_depth,
            max_queued_bytes,
            priority_clients,
            priority_workers: s.backend.priority_workers(priority_clients),
            monitor_interval: Duration::from_secs(self.monitor_interval),
            log_folder: self.save_logs.then(|| self.folder.clone()),
            log_capacity: self.total_requests,
            pin_threads: !self.no_pin,
            debug: self.debug,
            policy: LoopPolicy::AnswerWithoutEngine,
            max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
        })
    }
}

/// Loads the model into one pipeline per worker, starts the workers over `transport`, prints
/// `<role> listening on <at> | model .. | backend .. | N workers | poll .. | <tail>`, serves
/// until a stop and prints the stop report. `after_stop` runs once the report is written,
/// before a serving error is returned (a transport's own stop lines).
#[allow(clippy::too_many_arguments)] // each is one fact of the role; a struct would only rename them
pub fn serve<T: ServerTransport>(
    role: &str,
    args: &ServerArgs,
    metrics: &MetricsArgs,
    s: &Serving,
    max_payload: usize,
    transport: &mut T,
    (at, tail): (String, String),
    after_stop: impl FnOnce(&T),
) -> Result<()> {
    let opts = args.options(s, max_payload)?;
    let pipelines: Vec<Pipeline> = s
        .backend
        .sessions(&args.engine_file, opts.priority_clients)?
        .into_iter()
        .map(|session| Pipeline::new(session, max_payload, args.max_image_pixels))
        .collect();
    Labels::log_availability(&args.classes_file);
    let mut threads = ServerThreads::start(&opts, transport, pipelines)
        .context("starting worker and monitor threads")?;
    let recording = metrics.recording(opts.log_folder.as_deref())?;
    recording.serve_counters(role, metrics, threads.queue.clone())?;
    println!(
        "{role} listening on {at} | model {} | backend {} | {} workers | poll {} | {tail} | images up to {} px | queued requests up to {} MiB",
        args.engine_file.display(),
        s.backend.describe(),
        opts.workers,
        s.mode.name(),
        args.max_image_pixels,
        args.max_queued_mib,
    );
    let served = threads.serve(transport, &opts);
    // As the original: `<folder>_<total clients>` when the clients declared their number.
    let log_folder = opts
        .log_folder
        .as_deref()
        .map(|f| folder_for_run(f, transport.declared_total_clients()));
    let c = &threads.queue.counters;
    let finished = c.answered.load(Ordering::Relaxed) + c.rejected.load(Ordering::Relaxed);
    let mut info = run_info(role, transport_name(role));
    info.model = Some(args.engine_file.display().to_string());
    info.backend = Some(s.backend.describe());
    info.precision = (args.backend != "cpu").then(|| args.precision.clone());
    info.hosts = vec![at.clone()];
    info.files = vec![("server_requests.csv".into(), 1)];
    recording.finish(role, Some(finished), log_folder.as_deref(), info)?;
    threads
        .report_stop(
            role,
            s.backend.gpus(),
            log_folder.as_deref(),
            served.records,
        )
        .with_context(|| format!("writing the request log into {}", args.folder.display()))?;
    after_stop(transport);
    served.result.context("serving")?;
    Ok(())
}

/// The server's log folder for a run of `total_clients` declared clients: `<folder>_<N>`
/// (the original's naming), or `folder` itself when none was declared.
fn folder_for_run(folder: &std::path::Path, total_clients: Option<u32>) -> std::path::PathBuf {
    match total_clients {
        Some(n) => {
            let mut name = folder.as_os_str().to_os_string();
            name.push(format!("_{n}"));
            name.into()
        }
        None => folder.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::folder_for_run;
    use std::path::{Path, PathBuf};

    #[test]
    fn log_folder_carries_the_declared_client_count() {
        assert_eq!(
            folder_for_run(Path::new("results/run"), Some(8)),
            PathBuf::from("results/run_8")
        );
        assert_eq!(
            folder_for_run(Path::new("results"), None),
            PathBuf::from("results")
        );
    }
}

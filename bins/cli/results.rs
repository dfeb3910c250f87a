//! What every role writes beside its results with -s: run.json (the run's description, with
//! the build's revision and this command line) and resources.csv (its sampler's rows).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::MetricsArgs;
use hacserve_runtime::metrics::{render_counters, render_resources, serve_metrics};
use hacserve_runtime::protocol::Task;
use hacserve_runtime::resources::sampler::RESOURCES_SCHEMA;
use hacserve_runtime::resources::{ResourceSummary, Sampler};
use hacserve_runtime::results::{unix_now, RunInfo};
use hacserve_runtime::server::WorkQueue;

/// A RunInfo with the role, transport, revision (build.rs's `git describe`) and command line.
pub fn run_info(role: &str, transport: &str) -> RunInfo {
    RunInfo {
        role: role.into(),
        transport: transport.into(),
        git_revision: env!("HACSERVE_GIT_DESCRIBE").into(),
        command_line: std::env::args().collect(),
        ..Default::default()
    }
}

impl MetricsArgs {
    /// The role's recording: resources.csv in `folder` (-s), a sampler for the endpoint.
    pub fn recording(&self, folder: Option<&Path>) -> Result<Recording> {
        Recording::start(
            folder,
            Duration::from_millis(self.sample_ms),
            self.metrics_port.is_some(),
        )
    }
}

/// A role's resources sampler and its run.json, started together.
pub struct Recording {
    pub sampler: Option<Sampler>,
    pub start_unix: u64,
}

impl Recording {
    /// With `folder` (-s): resources.csv there, sampled every `period`; without, a sampler
    /// only when `live` (a metrics endpoint reads it), else none.
    pub fn start(folder: Option<&Path>, period: Duration, live: bool) -> Result<Recording> {
        let sampler = match folder {
            Some(f) => {
                std::fs::create_dir_all(f).with_context(|| format!("creating {}", f.display()))?;
                Some(Sampler::start(Some(&f.join("resources.csv")), period)?)
            }
            None if live => Some(Sampler::start(None, period)?),
            None => None,
        };
        Ok(Recording {
            sampler,
            start_unix: unix_now(),
        })
    }

    /// With `--metrics-port`: serves `render`'s text followed by the sampler's resources, and
    /// prints `<role> metrics on http://ADDR/metrics`.
    pub fn serve_metrics(
        &self,
        role: &str,
        m: &MetricsArgs,
        render: impl Fn(&mut String) + Send + 'static,
    ) -> Result<()> {
        let Some(port) = m.metrics_port else {
            return Ok(());
        };
        let latest = self.sampler.as_ref().map(|s| s.latest());
        let at = serve_metrics(&m.metrics_address, port, move |out| {
            render(out);
            if let Some(l) = &latest {
                render_resources(out, l);
            }
        })
        .with_context(|| format!("binding the metrics endpoint {}:{port}", m.metrics_address))?;
        println!("{role} metrics on http://{}/metrics", at.addr);
        Ok(())
    }

    /// [`Self::serve_metrics`] for a serving core: its counters (and the receive-to-reply
    /// histogram, which the core then times).
    pub fn serve_counters<Q>(
        &self,
        role: &str,
        m: &MetricsArgs,
        queue: Arc<WorkQueue<Q>>,
    ) -> Result<()>
    where
        WorkQueue<Q>: Send + Sync + 'static,
    {
        queue
            .counters
            .timed
            .store(m.metrics_port.is_some(), Ordering::Relaxed);
        self.serve_metrics(role, m, move |out| {
            render_counters(out, &queue.counters, |t| Task::from_u8(t).map(Task::name))
        })
    }

    /// Stops the sampler, prints its summary line (`<role> resources: ...`, per 1000 of
    /// `requests`) and with `folder` writes run.json (listing resources.csv and `files`, and
    /// `requests` as `finished_requests`).
    pub fn finish(
        self,
        role: &str,
        requests: Option<u64>,
        folder: Option<&Path>,
        mut info: RunInfo,
    ) -> Result<Option<ResourceSummary>> {
        let summary = match self.sampler {
            Some(s) => {
                let period = s.period;
                let summary = s.finish().context("sampling resources")?;
                println!("{role} {}", summary.line(period, requests));
                Some(summary)
            }
            None => None,
        };
        if let Some(f) = folder {
            info.files.push(("resources.csv".into(), RESOURCES_SCHEMA));
            // The denominator of the role's CPU-seconds per request (`report`).
            if let Some(n) = requests {
                info.extra.push(("finished_requests".into(), n.to_string()));
            }
            info.write(f, self.start_unix)
                .with_context(|| format!("writing {}/run.json", f.display()))?;
        }
        Ok(summary)
    }
}

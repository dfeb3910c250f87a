//! What every role writes beside its results with -s: run.json (the run's description, with
//! the build's revision and this command line) and resources.csv (its sampler's rows).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use hacserve_runtime::resources::sampler::RESOURCES_SCHEMA;
use hacserve_runtime::resources::{ResourceSummary, Sampler};
use hacserve_runtime::results::{unix_now, RunInfo};

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

    /// Stops the sampler, prints its summary line (`<role> resources: ...`, per 1000 of
    /// `requests`) and with `folder` writes run.json (listing resources.csv and `files`).
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
            info.write(f, self.start_unix)
                .with_context(|| format!("writing {}/run.json", f.display()))?;
        }
        Ok(summary)
    }
}

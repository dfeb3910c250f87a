//! `--check` of the roles that load libraries at run time: prints each finding of
//! `hacserve_runtime::check` and exits 0 when the role can run here, or 1 (through main's
//! error) naming everything that is missing.

use anyhow::{bail, Result};
use hacserve_runtime::check::{self, Section};

use super::server::Serving;
use super::version::stamp;
use super::ServerArgs;

/// Prints the sections and answers whether the role can run.
pub fn report(role: &str, sections: &[Section]) -> Result<()> {
    println!("{}", stamp(role));
    for section in sections {
        print!("{section}");
    }
    if sections.is_empty() {
        println!("nothing is loaded at run time: ZeroMQ and the CPU backend are built in");
    }
    let missing: Vec<String> = sections.iter().flat_map(Section::missing).collect();
    if !missing.is_empty() {
        bail!("{role} cannot run here: {}", missing.join("; "));
    }
    println!("{role} can run here");
    Ok(())
}

/// A server's check: the RDMA transport where `rdma`, and the GPU backend's libraries
/// when the chosen backend runs on GPUs.
pub fn server(role: &str, server: &ServerArgs, serving: &Serving, rdma: bool) -> Result<()> {
    let mut sections = Vec::new();
    if rdma {
        sections.push(check::rdma());
    }
    let gpus = serving.backend.gpus();
    if !gpus.is_empty() {
        sections.push(check::gpu(gpus, server.decode == "gpu"));
    }
    report(role, &sections)
}

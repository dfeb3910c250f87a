//! Backend selection: `--backend NAME` picks an entry of [`BACKENDS`]; the entry reads the
//! backend options it uses (`--gpus`, `--precision`, `--decode`, `--streams`, `--max-batch`,
//! `--threads`, `--workers`) into a configured [`Backend`], which then loads the model on
//! each of its devices and makes one engine session per worker. zmq_server and rdma_server
//! share it (the crate re-exports this module as `backend`), so a backend option means the
//! same on every transport.
//!
//! The list of backends, for the CLI, comes from here: an unknown name is refused with the
//! list, and `--backend help` answers [`BackendError::Help`] with it (argh's doc comments are
//! static, so the option's help only points there). Adding a backend: its file in `engine/`
//! (the loader, the sessions, one `pub const BACKEND: BackendEntry`), its `pub mod` line in
//! `engine/mod.rs`, and that entry in [`BACKENDS`]; nothing else names a backend.

use std::path::Path;

use super::{cudnn, tract_cpu, InferenceEngine};
pub use super::{Backend, BackendArgs, BackendEntry, BackendError};

/// Every backend the servers offer, in the order `--backend help` lists them.
pub const BACKENDS: &[BackendEntry] = &[tract_cpu::BACKEND, cudnn::BACKEND];

/// A parsed backend choice and the worker count it implies.
#[derive(Debug)]
pub struct BackendChoice {
    pub backend: Box<dyn Backend>,
    pub workers: usize,
}

/// `--backend help`'s text: one line per registered backend.
pub fn help() -> String {
    let width = BACKENDS.iter().map(|b| b.name.len()).max().unwrap_or(0);
    let mut text = String::from("inference backends (--backend NAME):");
    for b in BACKENDS {
        text.push_str(&format!("\n  {:width$}  {}", b.name, b.about));
    }
    text
}

/// "cpu or gpu", "a, b or c": the registered names for an error message.
fn names() -> String {
    let names: Vec<&str> = BACKENDS.iter().map(|b| b.name).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.to_string(),
        None => String::new(),
    }
}

impl BackendChoice {
    pub fn parse(a: &BackendArgs) -> Result<Self, BackendError> {
        if a.backend == "help" {
            return Err(BackendError::Help(help()));
        }
        if a.workers == 0 {
            return Err(BackendError::Option("--workers must be at least 1".into()));
        }
        let entry = BACKENDS
            .iter()
            .find(|b| b.name == a.backend)
            .ok_or_else(|| {
                BackendError::Option(format!(
                    "--backend {:?} is not known: use {}\n{}",
                    a.backend,
                    names(),
                    help()
                ))
            })?;
        let backend = (entry.configure)(a)?;
        let workers = backend.workers();
        Ok(BackendChoice { backend, workers })
    }

    /// One line for the start banner.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// GPU ordinals, empty for the CPU.
    pub fn gpus(&self) -> &[usize] {
        self.backend.gpus()
    }

    /// A stream on GPU `ordinal` from the backend (RDMA request rings in GPU memory).
    pub fn device_stream(
        &self,
        ordinal: usize,
    ) -> Result<std::sync::Arc<hacserve_ffi::gpu::cuda::cu::CudaStream>, BackendError> {
        self.backend.device_stream(ordinal)
    }

    /// Loads the model on every device and makes one session per worker: worker i runs on
    /// device i % devices. With `priority_clients`, the first worker of each GPU gets a
    /// high-priority stream (and the queue sends priority requests to those workers first,
    /// see the server's `ServerOptions::priority_workers`).
    pub fn sessions(
        &self,
        model: &Path,
        priority_clients: bool,
    ) -> Result<Vec<Box<dyn InferenceEngine>>, BackendError> {
        let names = self.backend.devices();
        if names.is_empty() {
            return Err(BackendError::Option(format!(
                "backend {} has no devices",
                self.describe()
            )));
        }
        let loaders = names
            .iter()
            .enumerate()
            .map(|(i, device)| {
                self.backend
                    .load(model, i)
                    .map_err(|source| BackendError::Load {
                        model: model.to_path_buf(),
                        device: device.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let priority_workers = self.priority_workers(priority_clients);
        let mut sessions = Vec::with_capacity(self.workers);
        for worker in 0..self.workers {
            let loader = &loaders[worker % loaders.len()];
            let session = if worker < priority_workers {
                loader.priority_session()
            } else {
                loader.session()
            };
            sessions.push(session.map_err(|source| BackendError::Session {
                worker,
                device: names[worker % names.len()].clone(),
                source,
            })?);
        }
        Ok(sessions)
    }

    /// Workers that serve priority requests first: one per GPU (on its high-priority
    /// stream) when priority clients are on; 0 otherwise (every worker takes the priority
    /// lane first, as on the CPU).
    pub fn priority_workers(&self, priority_clients: bool) -> usize {
        self.backend
            .priority_workers(self.workers, priority_clients)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args<'a>(backend: &'a str, gpus: &'a str, streams: u32) -> BackendArgs<'a> {
        BackendArgs {
            backend,
            precision: "fp16",
            gpus,
            decode: "gpu",
            threads: 1,
            workers: 3,
            streams,
            max_batch: 8,
            preferred_batch_sizes: "auto",
            overlap_batches: false,
        }
    }

    #[test]
    fn streams_set_contexts_per_gpu() {
        let c = BackendChoice::parse(&args("gpu", "0,1", 4)).unwrap();
        assert_eq!(c.workers, 8);
        assert_eq!(c.gpus(), &[0, 1]);
        assert_eq!(c.priority_workers(true), 2);
        assert_eq!(c.priority_workers(false), 0);
        let c = BackendChoice::parse(&args("gpu", "0", 0)).unwrap();
        assert_eq!(c.workers, 3);
        let c = BackendChoice::parse(&args("cpu", "0", 4)).unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(c.priority_workers(true), 0);
    }

    #[test]
    fn bad_options_are_named() {
        let e = BackendChoice::parse(&args("tpu", "0", 0)).unwrap_err();
        assert!(e.to_string().contains("tpu"), "{e}");
        assert!(e.to_string().contains("use cpu or gpu"), "{e}");
        let e = BackendChoice::parse(&args("gpu", "0,x", 0)).unwrap_err();
        assert!(e.to_string().contains("\"x\""), "{e}");
        let e = BackendChoice::parse(&args("gpu", "1,1", 0)).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let mut a = args("gpu", "0", 0);
        a.decode = "fpga";
        assert!(BackendChoice::parse(&a).is_err());
        let mut a = args("gpu", "0", 0);
        a.max_batch = 0;
        let e = BackendChoice::parse(&a).unwrap_err();
        assert!(e.to_string().contains("--max-batch 0"), "{e}");
    }

    #[test]
    fn help_lists_every_registered_backend() {
        let e = BackendChoice::parse(&args("help", "0", 0)).unwrap_err();
        assert!(e.is_help());
        for b in BACKENDS {
            assert!(e.to_string().contains(b.name), "{e}");
            assert!(e.to_string().contains(b.about), "{e}");
        }
    }

    #[test]
    fn banner_lines_are_unchanged() {
        let c = BackendChoice::parse(&args("cpu", "0", 0)).unwrap();
        assert_eq!(c.describe(), "tract-cpu x1 threads");
        let c = BackendChoice::parse(&args("gpu", "0,1", 0)).unwrap();
        assert_eq!(
            c.describe(),
            "cudnn-gpu Fp16 + CUDA graph on GPUs [0, 1], nvJPEG decode, dynamic batch up to 8"
        );
        let mut a = args("gpu", "0", 0);
        a.decode = "cpu";
        let c = BackendChoice::parse(&a).unwrap();
        assert_eq!(
            c.describe(),
            "cudnn-gpu Fp16 + CUDA graph on GPUs [0], CPU decode, dynamic batch up to 1"
        );
    }

    #[test]
    fn missing_model_names_file_and_device() {
        let c = BackendChoice::parse(&args("cpu", "0", 0)).unwrap();
        let e = c
            .sessions(Path::new("/nonexistent/model.onnx"), false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("/nonexistent/model.onnx") && e.contains("CPU"),
            "{e}"
        );
    }
}

//! The server roles' engine set-up: `--backend`, `--gpus`, `--precision`, `--streams`,
//! `--decode` and `--priority-clients` become one engine session per worker. zmq_server and
//! rdma_server share it, so a backend option means the same on every transport.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::engine::cudnn_gpu::{CudnnLoader, CudnnOptions, Precision};
use crate::engine::tract_cpu::TractLoader;
use crate::engine::{EngineError, EngineLoader, InferenceEngine};

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("{0}")]
    Option(String),
    #[error("loading model {model} on {device}: {source}")]
    Load {
        model: PathBuf,
        device: String,
        #[source]
        source: EngineError,
    },
    #[error("creating the engine context of worker {worker} on {device}: {source}")]
    Session {
        worker: usize,
        device: String,
        #[source]
        source: EngineError,
    },
}

/// Where inference runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// tract on the CPU, with this many intra-op threads per worker.
    Cpu { threads: usize },
    /// cuDNN/cuBLAS on these GPUs (workers round-robin over them).
    Gpu {
        gpus: Vec<usize>,
        precision: Precision,
        /// nvJPEG + the preprocessing kernel instead of the CPU decoder.
        gpu_decode: bool,
        /// JPEG requests that are ready together run as one batch of up to this many
        /// (GPU decode only; 1 = off).
        max_batch: usize,
    },
}

/// The backend options as the CLIs spell them.
#[derive(Debug, Clone)]
pub struct BackendArgs<'a> {
    pub backend: &'a str,
    pub precision: &'a str,
    pub gpus: &'a str,
    pub decode: &'a str,
    pub threads: usize,
    pub workers: usize,
    /// The original's `--streams`: engine contexts (CUDA streams) per GPU; 0 = use workers.
    pub streams: u32,
    /// Dynamic batch of the GPU backend (`--max-batch`).
    pub max_batch: usize,
}

/// A parsed backend choice and the worker count it implies.
#[derive(Debug, Clone)]
pub struct BackendChoice {
    pub device: Device,
    pub workers: usize,
}

impl BackendChoice {
    pub fn parse(a: &BackendArgs) -> Result<Self, BackendError> {
        let bad = |m: String| Err(BackendError::Option(m));
        if a.workers == 0 {
            return bad("--workers must be at least 1".into());
        }
        match a.backend {
            "cpu" => {
                if a.streams > 0 {
                    log::info!(
                        "--streams {} ignored: the CPU backend has no CUDA streams",
                        a.streams
                    );
                }
                Ok(BackendChoice {
                    device: Device::Cpu {
                        threads: a.threads.max(1),
                    },
                    workers: a.workers,
                })
            }
            "gpu" => {
                let gpus = parse_gpus(a.gpus)?;
                let precision = match a.precision {
                    "fp16" => Precision::Fp16,
                    "tf32" => Precision::Tf32,
                    "fp32" => Precision::Fp32,
                    other => return bad(format!("--precision {other:?}: use fp16, tf32 or fp32")),
                };
                let gpu_decode = match a.decode {
                    "gpu" => true,
                    "cpu" => false,
                    other => return bad(format!("--decode {other:?}: use gpu or cpu")),
                };
                if !(1..=64).contains(&a.max_batch) {
                    return bad(format!("--max-batch {} must be 1..=64", a.max_batch));
                }
                // --streams N: N engine contexts (each a worker with its own stream) per GPU.
                let workers = if a.streams > 0 {
                    a.streams as usize * gpus.len()
                } else {
                    a.workers
                };
                Ok(BackendChoice {
                    device: Device::Gpu {
                        gpus,
                        precision,
                        gpu_decode,
                        max_batch: if gpu_decode { a.max_batch } else { 1 },
                    },
                    workers,
                })
            }
            other => bad(format!("--backend {other:?} is not known: use cpu or gpu")),
        }
    }

    /// One line for the start banner.
    pub fn describe(&self) -> String {
        match &self.device {
            Device::Cpu { threads } => format!("tract-cpu x{threads} threads"),
            Device::Gpu {
                gpus,
                precision,
                gpu_decode,
                max_batch,
            } => format!(
                "cudnn-gpu {precision:?} + CUDA graph on GPUs {gpus:?}, {} decode, dynamic batch up to {max_batch}",
                if *gpu_decode { "nvJPEG" } else { "CPU" }
            ),
        }
    }

    /// GPU ordinals, empty for the CPU.
    pub fn gpus(&self) -> &[usize] {
        match &self.device {
            Device::Cpu { .. } => &[],
            Device::Gpu { gpus, .. } => gpus,
        }
    }

    /// Loads the model on every device and makes one session per worker: worker i runs on
    /// device i % devices. With `priority_clients`, the first worker of each GPU gets a
    /// high-priority stream (and the queue sends priority requests to those workers first,
    /// see [`crate::server::ServerOptions::priority_workers`]).
    pub fn sessions(
        &self,
        model: &Path,
        priority_clients: bool,
    ) -> Result<Vec<Box<dyn InferenceEngine>>, BackendError> {
        let load = |device: String, r: Result<Box<dyn EngineLoader>, EngineError>| {
            r.map_err(|source| BackendError::Load {
                model: model.to_path_buf(),
                device,
                source,
            })
        };
        let (loaders, names): (Vec<Box<dyn EngineLoader>>, Vec<String>) = match &self.device {
            Device::Cpu { threads } => {
                let l = TractLoader::load(model, *threads).map(|l| Box::new(l) as _);
                (vec![load("the CPU".into(), l)?], vec!["the CPU".into()])
            }
            Device::Gpu {
                gpus,
                precision,
                gpu_decode,
                max_batch,
            } => {
                let options = CudnnOptions {
                    batch: 1,
                    precision: *precision,
                    cuda_graph: true,
                    gpu_decode: *gpu_decode,
                    max_batch: *max_batch,
                };
                let mut loaders = Vec::with_capacity(gpus.len());
                let mut names = Vec::with_capacity(gpus.len());
                for &g in gpus {
                    let l = CudnnLoader::load_with(model, g, options).map(|l| Box::new(l) as _);
                    loaders.push(load(format!("GPU {g}"), l)?);
                    names.push(format!("GPU {g}"));
                }
                (loaders, names)
            }
        };
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
        match &self.device {
            Device::Gpu { gpus, .. } if priority_clients && self.workers > gpus.len() => gpus.len(),
            _ => 0,
        }
    }
}

/// "0,1,3" -> [0, 1, 3]; no duplicates.
pub fn parse_gpus(list: &str) -> Result<Vec<usize>, BackendError> {
    let mut gpus = Vec::new();
    for g in list.split(',') {
        let id = g
            .trim()
            .parse::<usize>()
            .map_err(|_| BackendError::Option(format!("bad GPU id {g:?} in --gpus {list:?}")))?;
        if gpus.contains(&id) {
            return Err(BackendError::Option(format!(
                "GPU {id} is listed twice in --gpus {list:?}"
            )));
        }
        gpus.push(id);
    }
    Ok(gpus)
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

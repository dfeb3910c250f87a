//! rdma_server: serves image classification over RDMA (RC queue pairs via rdma_cm; requests
//! and replies move with RDMA WRITE_WITH_IMM through per-client rings, see docs/rdma.md).

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context as _, Result};
use hacserve::cli::bind_ip;
use hacserve::cli::server::serve;
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::protocol::{DEFAULT_MAX_PAYLOAD, HEADER_LEN};
use hacserve_runtime::transport::rdma::{
    check_available, Addressing, GpuRing, RdmaServer, DEFAULT_PORT,
};

hacserve::cli_args! {
    /// RDMA Server: answers classification requests (protocol v2) over RDMA WRITE_WITH_IMM rings.
    struct Args [server, ring_limits, metrics, check] {
        /// RDMA listen port
        #[argh(option, short = 'p', default = "DEFAULT_PORT")]
        port: u16,
        /// memory addressing: 0 = host memory, 1 = GPU memory (GPUDirect RDMA)
        #[argh(option, short = 'a', default = "0")]
        addressing: u8,
        /// keep alive: 1 = keep serving after clients leave, 0 = stop when the last one left
        #[argh(option, short = 'k', default = "1")]
        keep_alive: u8,
        /// largest request payload in bytes (also bounded by each client's slot size)
        #[argh(option, default = "DEFAULT_MAX_PAYLOAD")]
        max_payload: usize,
        /// address to bind (default all RDMA-capable interfaces)
        #[argh(option, default = "String::from(\"0.0.0.0\")")]
        bind_address: String,
    }
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    let (server, ring) = (args.server(), args.ring_limits());
    ring.check()?;
    let Some(serving) = server.prepare()? else {
        return Ok(());
    };
    if args.check {
        return hacserve::cli::check::server("rdma_server", &server, &serving, true);
    }
    let ring_gpu = match (args.addressing, serving.backend.gpus().first()) {
        (0, _) => None,
        (1, Some(&gpu)) => Some(gpu),
        (1, None) => bail!("-a 1 (GPU memory) needs --backend gpu"),
        (other, _) => {
            bail!("-a/--addressing must be 0 (host memory) or 1 (GPU memory), not {other}")
        }
    };
    let ip = bind_ip(&args.bind_address)?;
    // RDMA first: a machine without it fails fast, before the model is loaded.
    let max_payload = args.max_payload.min(ring.slot_size as usize - HEADER_LEN);
    let listening = || format!("listening on {}:{}", args.bind_address, args.port);
    check_available().with_context(listening)?;
    // The rings' GPU stream comes from the backend, which owns the device contexts.
    let addressing = match ring_gpu {
        None => Addressing::Host,
        Some(gpu) => Addressing::Gpu(GpuRing {
            ordinal: gpu,
            stream: serving
                .backend
                .device_stream(gpu)
                .map_err(|e| anyhow!("GPU addressing on GPU {gpu}: {e}"))
                .with_context(listening)?,
        }),
    };
    let events = serving.mode.receive == PollMode::Event;
    if events && ring_gpu.is_some() {
        bail!("--poll-mode event needs host memory rings (-a 0): a GPU ring is polled");
    }
    let mut cfg = ring.server_config(args.keep_alive != 0, addressing, events);
    // -a 0 with a GPU backend: the copy rings the engine uploads from are registered with
    // CUDA (per connection, at set-up), so processed and raw payloads are DMA'd in place.
    if ring_gpu.is_none() {
        if let Some(&gpu) = serving.backend.gpus().first() {
            match serving.backend.device_stream(gpu) {
                Ok(stream) => cfg.host_ring_cuda = Some(stream.context().clone()),
                Err(e) => log::warn!(
                    "request copy rings stay unregistered with CUDA (GPU {gpu}: {e}): \
                     uploads from them are staged by the driver"
                ),
            }
        }
    }
    let mut rdma = RdmaServer::listen(SocketAddr::new(ip, args.port), cfg, max_payload)
        .with_context(|| format!("listening on {}:{}", args.bind_address, args.port))?;
    let registering = ring_gpu.is_none() && !serving.backend.gpus().is_empty();
    let memory = match ring_gpu {
        None if registering => "host memory (copy rings registered with CUDA)".to_string(),
        None => "host memory".to_string(),
        Some(g) => format!("GPU memory (GPU {g}, GPUDirect RDMA)"),
    };
    let banner = (format!("{} | {memory}", rdma.addr()), ring.describe());
    let served = serve(
        "rdma_server",
        &server,
        &args.metrics(),
        &serving,
        max_payload,
        &mut rdma,
        banner,
        |_| {},
    );
    if registering {
        let n = hacserve_runtime::transport::rdma::cuda_host_registrations();
        log::info!(
            "CUDA host registrations of request copy rings: {} ({} B), {} refused",
            n.registered,
            n.bytes,
            n.failed
        );
    }
    served
}

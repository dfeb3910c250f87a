//! zmq_server: serves image classification over ZeroMQ/TCP.

#![forbid(unsafe_code)]

use anyhow::{Context as _, Result};
use hacserve::cli::server::serve;
use hacserve_runtime::libzmq::Context;
use hacserve_runtime::protocol::DEFAULT_MAX_PAYLOAD;
use hacserve_runtime::transport::zmq::{ZmqServer, DEFAULT_REPLY_HWM};

hacserve::cli_args! {
    /// ZMQ Server: answers classification requests (protocol v2) on a ROUTER socket.
    struct Args [server, metrics, check] {
        /// ZMQ listen port (0 = any free port, printed at start)
        #[argh(option, default = "5555")]
        port: u16,
        /// address to bind (default all interfaces)
        #[argh(option, default = "String::from(\"0.0.0.0\")")]
        bind_address: String,
        /// largest request payload in bytes (default 16 MiB)
        #[argh(option, default = "DEFAULT_MAX_PAYLOAD")]
        max_payload: usize,
        /// replies queued per client before further ones are dropped (a client that does not
        /// read its replies; counted per client)
        #[argh(option, default = "DEFAULT_REPLY_HWM")]
        reply_hwm: usize,
    }
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    let server = args.server();
    let Some(serving) = server.prepare()? else {
        return Ok(());
    };
    if args.check {
        return hacserve::cli::check::server("zmq_server", &server, &serving, false);
    }
    let ctx = Context::new().context("creating the ZeroMQ context")?;
    let mut zmq = ZmqServer::bind(
        &ctx,
        &args.bind_address,
        args.port,
        args.max_payload,
        args.reply_hwm,
    )
    .with_context(|| format!("binding tcp://{}:{}", args.bind_address, args.port))?;
    if !serving.backend.gpus().is_empty() {
        // Registering a buffer with CUDA pins its pages (a system call): worth it for buffers
        // that live long, as RDMA's copy rings; libzmq allocates each received message itself,
        // so here it would be one per request. Uploads from them are staged by the driver.
        log::info!(
            "ZeroMQ receive buffers are libzmq's per-message allocations: not registered with \
             CUDA (0 registrations); processed tensors are uploaded as received and converted \
             on the GPU, staged by the driver"
        );
    }
    let banner = (
        zmq.endpoint().to_string(),
        format!("max payload {} B", args.max_payload),
    );
    serve(
        "zmq_server",
        &server,
        &args.metrics(),
        &serving,
        args.max_payload,
        &mut zmq,
        banner,
        |zmq| {
            if let Some(drops) = zmq.slow_peer_summary() {
                println!("zmq_server replies dropped, clients not reading: {drops}");
            }
        },
    )
}

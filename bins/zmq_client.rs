//! zmq_client: sends `-r` requests of one image to a zmq_server (or a balancer/proxy in
//! front of it) and prints the latency table.

#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::{Context as _, Result};
use hacserve_runtime::libzmq::Context;
use hacserve_runtime::protocol::{DEFAULT_MAX_PAYLOAD, HEADER_LEN, LOGITS_LEN, RESPONSE_BODY_LEN};
use hacserve_runtime::transport::zmq::ZmqClient;

hacserve::cli_args! {
    /// ZMQ Client: closed-loop requests to a zmq_server, latency table per stage.
    struct Args [client] {
        /// ZMQ server port
        #[argh(option, default = "5555")]
        port: u16,
        /// how long to wait for each reply, in ms
        #[argh(option, default = "30000")]
        timeout_ms: u64,
        /// busy (spin) or block while waiting for a reply
        #[argh(option, default = "String::from(\"block\")")]
        poll_mode: String,
    }
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    let client = args.client();
    let mode = client.prepare(&args.poll_mode)?;
    let payloads = client.payloads()?;
    let longest = hacserve::cli::ClientArgs::longest_request(&payloads);
    let ctx = Context::new().context("creating the ZeroMQ context")?;
    let max_reply = RESPONSE_BODY_LEN + LOGITS_LEN + longest.max(HEADER_LEN + DEFAULT_MAX_PAYLOAD);
    let mut transport = ZmqClient::connect(
        &ctx,
        &client.host,
        args.port,
        Duration::from_millis(args.timeout_ms),
        mode,
        max_reply,
    )
    .with_context(|| format!("connecting to tcp://{}:{}", client.host, args.port))?;
    client.run(
        "zmq_client",
        args.port,
        &mut transport,
        &payloads,
        max_reply,
    )
}

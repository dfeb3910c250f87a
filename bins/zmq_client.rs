//! zmq_client: sends `-r` requests of one image to a zmq_server (or a balancer/proxy in
//! front of it) and prints the latency table.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::client::{prepare_payload, report_run, run_closed_loop, ClientOptions};
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::libzmq::Context;
use hacserve_runtime::protocol::{Task, DEFAULT_MAX_PAYLOAD, HEADER_LEN, RESPONSE_BODY_LEN};
use hacserve_runtime::transport::zmq::ZmqClient;
use hacserve_runtime::{logging, signal};

#[derive(FromArgs)]
/// ZMQ Client: closed-loop requests to a zmq_server, latency table per stage.
struct Args {
    /// server host
    #[argh(option, default = "String::from(\"7.7.7.2\")")]
    host: String,
    /// ZMQ server port
    #[argh(option, default = "5555")]
    port: u16,
    /// image (JPEG)
    #[argh(
        option,
        short = 'i',
        default = "PathBuf::from(\"models/grace_hopper.jpg\")"
    )]
    image: PathBuf,
    /// use debug (a line per request)
    #[argh(switch, short = 'd')]
    debug: bool,
    /// total requests
    #[argh(option, short = 'r', default = "1")]
    requests: usize,
    /// client ID
    #[argh(option, default = "0")]
    client_id: u32,
    /// task: 0|infer, 1|infer-tensor, 2|preprocess, 3|echo, 4|sink
    #[argh(option, short = 't', default = "Task::Infer", from_str_fn(parse_task))]
    task: Task,
    /// save logs (per-request CSV and JSON summary in the logs folder)
    #[argh(switch, short = 's')]
    save_logs: bool,
    /// logs folder
    #[argh(option, short = 'f', default = "PathBuf::from(\"results\")")]
    folder: PathBuf,
    /// model name (recorded in the summary; the server serves one model)
    #[argh(option, default = "String::from(\"resnet50\")")]
    model_name: String,
    /// requests sent first and not measured
    #[argh(option, default = "0")]
    warmup: usize,
    /// echo and sink tasks only: send this many zero bytes instead of the image
    #[argh(option)]
    payload_size: Option<usize>,
    /// ask for the high-priority lane
    #[argh(switch)]
    priority: bool,
    /// how long to wait for each reply, in ms
    #[argh(option, default = "30000")]
    timeout_ms: u64,
    /// busy (spin) or block while waiting for a reply
    #[argh(option, default = "String::from(\"block\")")]
    poll_mode: String,
    /// classes file, to print the top-1 class name
    #[argh(option, default = "PathBuf::from(\"models/imagenet_classes.txt\")")]
    classes_file: PathBuf,
}

fn parse_task(s: &str) -> Result<Task, String> {
    Task::parse(s)
}

fn main() -> Result<()> {
    let args: Args = argh::from_env();
    logging::init(args.debug);
    signal::install_stop_handler();
    let mode = PollMode::parse(&args.poll_mode, 1).map_err(anyhow::Error::msg)?;
    if args.payload_size.is_some() && args.task != Task::Echo && args.task != Task::Sink {
        bail!("--payload-size applies to the echo and sink tasks (-t 3, -t 4) only");
    }
    let image = if args.payload_size.is_some() {
        Vec::new()
    } else {
        std::fs::read(&args.image)
            .with_context(|| format!("reading image {}", args.image.display()))?
    };
    let payload = prepare_payload(args.task, &image, args.payload_size)
        .with_context(|| format!("preparing the {} payload", args.task.name()))?;
    let ctx = Context::new().context("creating the ZeroMQ context")?;
    let max_reply = HEADER_LEN + RESPONSE_BODY_LEN + payload.len().max(DEFAULT_MAX_PAYLOAD);
    let mut transport = ZmqClient::connect(
        &ctx,
        &args.host,
        args.port,
        Duration::from_millis(args.timeout_ms),
        mode,
        max_reply,
    )
    .with_context(|| format!("connecting to tcp://{}:{}", args.host, args.port))?;
    let opts = ClientOptions {
        client_id: args.client_id,
        task: args.task,
        requests: args.requests,
        priority: args.priority,
        warmup: args.warmup,
        max_reply,
        debug: args.debug,
    };
    let run = run_closed_loop(&mut transport, &opts, &payload);
    let label = format!(
        "zmq_client {} -> {}:{} task {} ({} B payload) model {}",
        args.client_id,
        args.host,
        args.port,
        args.task.name(),
        payload.len(),
        args.model_name
    );
    report_run(
        &run,
        &label,
        args.client_id,
        &args.classes_file,
        args.save_logs.then_some(args.folder.as_path()),
    )
    .context("writing the run's logs")?;
    if let Some(e) = run.failure {
        bail!(
            "run stopped after {} of {} requests: {e}",
            run.records.len(),
            args.requests
        );
    }
    Ok(())
}

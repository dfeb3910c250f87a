//! rdma_client: sends `-r` requests of one image to an rdma_server over RDMA
//! (WRITE_WITH_IMM into its request ring) and prints the latency table.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::client::{prepare_payload, report_run, run_closed_loop, ClientOptions};
use hacserve_runtime::contract::ClientTransport;
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::protocol::{
    decode_error, Header, MessageKind, Task, HEADER_LEN, RESPONSE_BODY_LEN,
};
use hacserve_runtime::transport::rdma::{
    encode_imm, RdmaClient, RdmaClientConfig, DEFAULT_PORT, IMM_LEN_MASK, MAX_DEPTH, MAX_SLOT_SIZE,
    MIN_SLOT_SIZE,
};
use hacserve_runtime::{logging, signal};

#[derive(FromArgs)]
/// RDMA Client: closed-loop requests to an rdma_server, latency table per stage.
struct Args {
    /// RDMA host
    #[argh(option, default = "String::from(\"7.7.7.2\")")]
    host: String,
    /// RDMA server port
    #[argh(option, short = 'p', default = "DEFAULT_PORT")]
    port: u16,
    /// use debug (a line per request)
    #[argh(switch, short = 'd')]
    debug: bool,
    /// total requests
    #[argh(option, short = 'r', default = "1")]
    requests: usize,
    /// task: 0|infer, 1|infer-tensor, 2|preprocess, 3|echo, 4|sink
    #[argh(option, short = 't', default = "Task::Infer", from_str_fn(parse_task))]
    task: Task,
    /// image (JPEG)
    #[argh(
        option,
        short = 'i',
        default = "PathBuf::from(\"models/grace_hopper.jpg\")"
    )]
    image: PathBuf,
    /// client ID
    #[argh(option, default = "0")]
    client_id: u32,
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
    /// how long to wait for the connection and for each reply, in ms
    #[argh(option, default = "30000")]
    timeout_ms: u64,
    /// busy (spin) or block (yield/sleep) while waiting for a reply
    #[argh(option, default = "String::from(\"block\")")]
    poll_mode: String,
    /// request slot size in bytes (default: the request rounded up to 4 KiB)
    #[argh(option)]
    slot_size: Option<u32>,
    /// ring depth: requests the client may have in flight
    #[argh(option, default = "4")]
    ring_depth: u32,
    /// classes file, to print the top-1 class name
    #[argh(option, default = "PathBuf::from(\"models/imagenet_classes.txt\")")]
    classes_file: PathBuf,
    /// after the run, send one request with a bad immediate to test the server: "length"
    /// (beyond the slot: expects an error reply) or "slot" (outside the ring: expects the
    /// server to disconnect this client)
    #[argh(option)]
    bad_imm: Option<String>,
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
    if let Some(b) = &args.bad_imm {
        if b != "length" && b != "slot" {
            bail!("--bad-imm must be \"length\" or \"slot\", not {b:?}");
        }
    }
    if args.ring_depth == 0 || args.ring_depth > MAX_DEPTH {
        bail!("--ring-depth must be 1..={MAX_DEPTH}");
    }
    let image = if args.payload_size.is_some() {
        Vec::new()
    } else {
        std::fs::read(&args.image)
            .with_context(|| format!("reading image {}", args.image.display()))?
    };
    let payload = prepare_payload(args.task, &image, args.payload_size)
        .with_context(|| format!("preparing the {} payload", args.task.name()))?;
    let want = HEADER_LEN + payload.len();
    let slot_size = match args.slot_size {
        Some(s) => s,
        None => (want.div_ceil(4096) * 4096).max(MIN_SLOT_SIZE as usize) as u32,
    };
    if !(MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&slot_size) {
        bail!(
            "slot size {slot_size} outside {MIN_SLOT_SIZE}..={MAX_SLOT_SIZE} bytes (a request of {want} bytes needs a slot that large)"
        );
    }
    if want > slot_size as usize {
        bail!("a request of {want} bytes does not fit --slot-size {slot_size}");
    }
    let cfg = RdmaClientConfig {
        client_id: args.client_id,
        slot_size,
        depth: args.ring_depth,
        timeout: Duration::from_millis(args.timeout_ms),
        mode,
    };
    let mut transport = RdmaClient::connect(&args.host, args.port, cfg)
        .with_context(|| format!("connecting to rdma://{}:{}", args.host, args.port))?;
    println!(
        "rdma_client {} connected to {}:{} ({} slots x {} B)",
        args.client_id, args.host, args.port, args.ring_depth, slot_size
    );
    let max_reply = slot_size as usize + RESPONSE_BODY_LEN;
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
        "rdma_client {} -> {}:{} task {} ({} B payload) model {}",
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
    if let Some(kind) = &args.bad_imm {
        bad_immediate(
            &mut transport,
            kind,
            slot_size,
            args.ring_depth,
            args.client_id,
        )?;
    }
    Ok(())
}

/// Sends one echo request whose immediate is wrong and checks the server's answer.
fn bad_immediate(
    t: &mut RdmaClient,
    kind: &str,
    slot_size: u32,
    depth: u32,
    client_id: u32,
) -> Result<()> {
    let mut msg = [0u8; HEADER_LEN];
    Header::request(Task::Echo, client_id, 999_999, 0).encode(&mut msg);
    if kind == "length" {
        let imm = encode_imm(t.next_slot(), (slot_size + 1).min(IMM_LEN_MASK))
            .context("encoding the bad immediate")?;
        t.send_with_imm(&msg, imm)?;
        let reply = t
            .recv()
            .context("waiting for the server's answer to a bad length")?;
        let (h, body) = Header::decode(reply, usize::MAX).context("decoding the answer")?;
        if h.kind != MessageKind::Error {
            bail!(
                "bad length: the server answered {:?}, an error was expected",
                h.kind
            );
        }
        let (code, text) = decode_error(body).context("decoding the error")?;
        println!("bad length: server answered error {code}: {text}");
        Ok(())
    } else {
        if depth >= MAX_DEPTH {
            bail!("--bad-imm slot needs --ring-depth below {MAX_DEPTH}");
        }
        let imm = encode_imm(depth, HEADER_LEN as u32).context("encoding the bad immediate")?;
        t.send_with_imm(&msg, imm)?;
        match t.recv() {
            Ok(reply) => bail!(
                "bad slot: the server answered ({} bytes) instead of disconnecting",
                reply.len()
            ),
            Err(e) => {
                println!("bad slot: server disconnected this client: {e}");
                Ok(())
            }
        }
    }
}

//! rdma_client: sends `-r` requests of one image to an rdma_server over RDMA
//! (WRITE_WITH_IMM into its request ring) and prints the latency table.

#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use hacserve_runtime::check;
use hacserve_runtime::contract::{ClientTransport, TransportError};
use hacserve_runtime::protocol::{decode_error, Header, MessageKind, Task, HEADER_LEN};
use hacserve_runtime::transport::rdma::{
    check_geometry, encode_imm, fast_response_slot_size, response_slot_size, GeometryError,
    RdmaClient, RdmaClientConfig, DEFAULT_PORT, FAST_WORD_LEN, IMM_LEN_MASK, MAX_DEPTH,
    MIN_SLOT_SIZE,
};

hacserve::cli_args! {
    /// RDMA Client: closed-loop requests to an rdma_server, latency table per stage.
    struct Args [client, check] {
        /// RDMA server port
        #[argh(option, short = 'p', default = "DEFAULT_PORT")]
        port: u16,
        /// total clients of the run, told to the server, which writes its -s logs into
        /// `<folder>_<total clients>` as the original does
        #[argh(option, short = 'c', default = "1")]
        total_clients: u32,
        /// how long to wait for the connection and for each reply, in ms
        #[argh(option, default = "30000")]
        timeout_ms: u64,
        /// busy (spin), block (yield/sleep) or event (sleep on the CQ's completion channel)
        /// while waiting for a reply
        #[argh(option, default = "String::from(\"block\")")]
        poll_mode: String,
        /// ask for the memory-polled fast path (requests and replies up to 8192 B as a plain
        /// RDMA WRITE and a completion word the receiver polls): on or off (default on; not
        /// asked in event mode; a server that does not grant it is used with WRITE_WITH_IMM)
        #[argh(option, default = "String::from(\"on\")")]
        fast_path: String,
        /// request slot size in bytes (default: the request rounded up to 4 KiB)
        #[argh(option)]
        slot_size: Option<u32>,
        /// ring depth: requests the client may have in flight
        #[argh(option, default = "4")]
        ring_depth: u32,
        /// after the run, send one request with a bad immediate to test the server: "length"
        /// (beyond the slot: expects an error reply) or "slot" (outside the ring: expects the
        /// server to disconnect this client)
        #[argh(option)]
        bad_imm: Option<String>,
        /// receives to post before connecting (default: one per slot). Fewer breaks the
        /// protocol: the server's reply writes then wait for a receive that never comes (a
        /// test of its --peer-timeout-ms)
        #[argh(option)]
        post_receives: Option<u32>,
    }
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    if args.check {
        return hacserve::cli::check::report("rdma_client", &[check::rdma()]);
    }
    let client = args.client();
    let mode = client.prepare(&args.poll_mode)?;
    if let Some(b) = &args.bad_imm {
        if b != "length" && b != "slot" {
            bail!("--bad-imm must be \"length\" or \"slot\", not {b:?}");
        }
    }
    let fast_path = hacserve::cli::on_off(&args.fast_path, "--fast-path")?;
    let payloads = client.payloads()?;
    let want = hacserve::cli::ClientArgs::longest_request(&payloads);
    // A fast-path slot keeps its last 4 bytes for the completion word.
    let room = want + if fast_path { FAST_WORD_LEN } else { 0 };
    let slot_size = match args.slot_size {
        Some(s) => s,
        None => (room.div_ceil(4096) * 4096).max(MIN_SLOT_SIZE as usize) as u32,
    };
    match check_geometry(args.ring_depth, slot_size) {
        // The slot was derived from the request: say so, the user never named a size.
        Err(e @ GeometryError::SlotSize(_)) if args.slot_size.is_none() => {
            bail!("{e} (a request of {want} bytes needs a slot that large)")
        }
        checked => checked?,
    }
    if want > slot_size as usize {
        bail!("a request of {want} bytes does not fit --slot-size {slot_size}");
    }
    let cfg = RdmaClientConfig {
        client_id: client.client_id,
        slot_size,
        depth: args.ring_depth,
        timeout: Duration::from_millis(args.timeout_ms),
        mode,
        total_clients: args.total_clients,
        // A request filling the slot leaves no room for the word: WRITE_WITH_IMM then.
        fast_path: fast_path && room <= slot_size as usize,
    };
    let receives = args.post_receives.unwrap_or(args.ring_depth);
    let mut transport =
        match RdmaClient::connect_with_receives(&client.host, args.port, cfg, receives) {
            Ok(t) => t,
            Err(TransportError::Refused(why)) => {
                // The server said why: print it as the one line a user needs.
                eprintln!(
                    "rdma_client {}: refused by rdma://{}:{}: {why}",
                    client.client_id, client.host, args.port
                );
                std::process::exit(3);
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("connecting to rdma://{}:{}", client.host, args.port))
            }
        };
    println!(
        "rdma_client {} connected to {}:{} ({} slots x {} B, {})",
        client.client_id,
        client.host,
        args.port,
        args.ring_depth,
        slot_size,
        if transport.fast_path() {
            "fast path"
        } else {
            "WRITE_WITH_IMM"
        }
    );
    let max_reply = if transport.fast_path() {
        fast_response_slot_size(slot_size) as usize - FAST_WORD_LEN
    } else {
        response_slot_size(slot_size) as usize
    };
    client.run(
        "rdma_client",
        args.port,
        &mut transport,
        &payloads,
        max_reply,
    )?;
    if let Some(kind) = &args.bad_imm {
        bad_immediate(
            &mut transport,
            kind,
            slot_size,
            args.ring_depth,
            client.client_id,
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

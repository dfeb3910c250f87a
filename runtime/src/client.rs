//! The closed-loop client shared by every client role: one request in flight, each reply
//! checked and timed, records preallocated for the whole run.

use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::clock::realtime_ns;
use crate::contract::{ClientTransport, TransportError};
use crate::labels::Labels;
use crate::preprocess::{swap_red_blue, PreprocessError, Preprocessor, TENSOR_LEN};
use crate::protocol::{
    decode_error, Header, MessageKind, ProtocolError, RawImage, ResponseBody, Task, Workload,
    FLAG_LOGITS, FLAG_PRIORITY, HEADER_LEN, LOGITS_LEN, RESPONSE_BODY_LEN,
};
use crate::stats::{write_csv, Report, RequestRecord};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("malformed reply: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("reply is for request {got}, expected {want}")]
    Mismatch { want: u64, got: u64 },
    #[error("reply kind {0:?} where a response was expected")]
    UnexpectedKind(MessageKind),
    #[error("{task} reply carries {got} bytes after its body, {want} expected")]
    ReplyLength {
        task: &'static str,
        want: usize,
        got: usize,
    },
    #[error("cannot preprocess the image locally: {0}")]
    Preprocess(#[from] PreprocessError),
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub client_id: u32,
    /// Ask for the logits in every inference's reply ([`FLAG_LOGITS`]).
    pub logits: bool,
    pub requests: usize,
    pub priority: bool,
    /// Requests sent before measuring (their records are not kept).
    pub warmup: usize,
    pub max_reply: usize,
    pub debug: bool,
    /// How long to keep trying to connect again after the connection was lost (transports
    /// that do it themselves, ZeroMQ, ignore it).
    pub reconnect_within: Duration,
}

/// What a run produced: one record per measured request, the wall time, and the error that
/// ended it early, if any (records up to that point are still valid).
pub struct ClientRun {
    pub records: Vec<RequestRecord>,
    pub wall: Duration,
    pub failure: Option<ClientError>,
}

/// One task's request payload, built once before the run.
#[derive(Debug, Clone)]
pub struct RequestPayload {
    pub task: Task,
    pub bytes: Vec<u8>,
}

/// Builds the request payload for `task` from an image file's bytes: nothing for a ping,
/// the JPEG itself, the pixels the client decoded ([`RawImage`], BGR) for raw, the locally
/// preprocessed tensor (f32 LE, NCHW) for processed, or `echo_size` zero bytes for an echo
/// or a sink when a size is given. The decoding happens here, before any timing, as the
/// original client decodes its image once with OpenCV.
pub fn prepare_payload(
    task: Task,
    image: &[u8],
    echo_size: Option<usize>,
) -> Result<Vec<u8>, ClientError> {
    Ok(match task {
        Task::Ping => Vec::new(),
        Task::Jpeg | Task::Preprocess => image.to_vec(),
        Task::Echo | Task::Sink => match echo_size {
            Some(n) => vec![0u8; n],
            None => image.to_vec(),
        },
        Task::Raw => {
            let mut pre = Preprocessor::new(crate::pipeline::MAX_IMAGE_PIXELS);
            pre.decode(image)?;
            let (rgb, width, height) = pre.decoded_rgb().ok_or(PreprocessError::NotDecoded)?;
            RawImage::encode(width, height, &swap_red_blue(rgb))
        }
        Task::Processed => {
            let mut pre = Preprocessor::new(crate::pipeline::MAX_IMAGE_PIXELS);
            pre.decode(image)?;
            let mut tensor = vec![0f32; TENSOR_LEN];
            pre.preprocess(&mut tensor)?;
            tensor.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
    })
}

/// The payloads of every task `workload` sends, in its rotation order.
pub fn prepare_payloads(
    workload: Workload,
    image: &[u8],
    echo_size: Option<usize>,
) -> Result<Vec<RequestPayload>, ClientError> {
    workload
        .tasks()
        .iter()
        .map(|&task| {
            prepare_payload(task, image, echo_size).map(|bytes| RequestPayload { task, bytes })
        })
        .collect()
}

/// Sends `opts.requests` requests one after another and records each reply; request `i`
/// carries `payloads[i % payloads.len()]` (one payload, or a mixture's rotation).
pub fn run_closed_loop<T: ClientTransport>(
    transport: &mut T,
    opts: &ClientOptions,
    payloads: &[RequestPayload],
) -> ClientRun {
    // One message per task, built once: each request rewrites only its header.
    let mut messages: Vec<(Task, Vec<u8>)> = payloads
        .iter()
        .map(|p| {
            let mut m = vec![0u8; HEADER_LEN + p.bytes.len()];
            m[HEADER_LEN..].copy_from_slice(&p.bytes);
            (p.task, m)
        })
        .collect();
    let mut records = Vec::with_capacity(opts.requests);
    let mut failure = None;
    let total = opts.warmup + opts.requests;
    let mut start = Instant::now();
    for i in 0..total {
        if i == opts.warmup {
            start = Instant::now();
        }
        let Some((task, message)) = messages.get_mut(i % payloads.len().max(1)) else {
            break;
        };
        let payload_len = message.len() - HEADER_LEN;
        let mut header = Header::request(*task, opts.client_id, i as u64, payload_len);
        if opts.priority {
            header.flags |= FLAG_PRIORITY;
        }
        if opts.logits && task.infers() {
            header.flags |= FLAG_LOGITS;
        }
        let mut h = [0u8; HEADER_LEN];
        header.encode(&mut h);
        message[..HEADER_LEN].copy_from_slice(&h);
        match one_request(transport, opts, message, header) {
            Ok(record) => {
                if opts.debug {
                    log::debug!(
                        "request {i}: status {} e2e {:.1} us top1 {}",
                        record.status,
                        record.e2e_ns as f64 / 1e3,
                        record.top1
                    );
                }
                if i >= opts.warmup {
                    records.push(record);
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    ClientRun {
        records,
        wall: start.elapsed(),
        failure,
    }
}

fn one_request<T: ClientTransport>(
    transport: &mut T,
    opts: &ClientOptions,
    message: &[u8],
    header: Header,
) -> Result<RequestRecord, ClientError> {
    let client_sent = realtime_ns();
    let t0 = Instant::now();
    let mut reconnected = false;
    loop {
        let outcome = transport.send(message).and_then(|()| transport.recv());
        match outcome {
            Ok(reply) => {
                let e2e_ns = t0.elapsed().as_nanos() as u64;
                return record_of(reply, opts, message, header, client_sent, e2e_ns);
            }
            // A lost connection (a server that died) is set up again once, and the same
            // request sent again: the restarted server answers it. Its time counts.
            Err(e) if e.lost() && !reconnected && !opts.reconnect_within.is_zero() => {
                log::warn!(
                    "request {}: connection lost ({e}); connecting again",
                    header.request_id
                );
                if !transport.reconnect(opts.reconnect_within)? {
                    return Err(e.into());
                }
                log::warn!(
                    "request {}: reconnected, sending it again",
                    header.request_id
                );
                reconnected = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Checks one reply to the request in `message` and records it.
fn record_of(
    reply: &[u8],
    opts: &ClientOptions,
    message: &[u8],
    header: Header,
    client_sent: u64,
    e2e_ns: u64,
) -> Result<RequestRecord, ClientError> {
    let client_received = realtime_ns();
    let (h, body) = Header::decode(reply, opts.max_reply)?;
    if h.request_id != header.request_id {
        return Err(ClientError::Mismatch {
            want: header.request_id,
            got: h.request_id,
        });
    }
    let mut record = RequestRecord {
        client_id: header.client_id,
        request_id: header.request_id,
        task: header.task as u8,
        client_sent,
        client_received,
        e2e_ns,
        top1: -1,
        ..Default::default()
    };
    match h.kind {
        MessageKind::Response => {
            let r = ResponseBody::decode(body)?;
            // An echo carries the payload back, an inference asked for them its logits,
            // everything else nothing after the body.
            let want = match header.task {
                Task::Echo => message.len() - HEADER_LEN,
                t if t.infers() && header.flags & FLAG_LOGITS != 0 => LOGITS_LEN,
                _ => 0,
            };
            let got = body.len() - RESPONSE_BODY_LEN;
            if want != got {
                return Err(ClientError::ReplyLength {
                    task: header.task.name(),
                    want,
                    got,
                });
            }
            record.server = r.timestamps;
            if r.top_k > 0 {
                record.top1 = r.classes[0] as i64;
            }
        }
        MessageKind::Error => {
            let (code, text) = decode_error(body)?;
            log::warn!("request {}: server error {code}: {text}", header.request_id);
            record.status = code;
        }
        MessageKind::Request => return Err(ClientError::UnexpectedKind(h.kind)),
    }
    Ok(record)
}

/// What every client role prints and keeps after a run: the stage table, the most common
/// top-1 with its class name, and with `save_to` the per-request CSV and the JSON summary
/// (`client_<id>.csv`, `client_<id>_summary.json`).
pub fn report_run(
    run: &ClientRun,
    label: &str,
    client_id: u32,
    classes_file: &Path,
    save_to: Option<&Path>,
) -> std::io::Result<Report> {
    let report = Report::from_records(label, &run.records, run.wall.as_secs_f64());
    println!("{}", report.table());
    if let Some(top1) = most_common_top1(&run.records) {
        let name = Labels::load(classes_file, None)
            .map(|l| l.name(top1 as usize).into_owned())
            .unwrap_or_else(|_| format!("class {top1}"));
        println!(" top-1: {top1} ({name})");
    }
    if let Some(folder) = save_to {
        let with_path = |path: &Path| {
            let shown = path.display().to_string();
            move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{shown}: {e}"))
        };
        std::fs::create_dir_all(folder).map_err(with_path(folder))?;
        let csv = folder.join(format!("client_{client_id}.csv"));
        write_csv(&csv, &run.records).map_err(with_path(&csv))?;
        let json = folder.join(format!("client_{client_id}_summary.json"));
        std::fs::write(&json, report.json() + "\n").map_err(with_path(&json))?;
        println!(" logs: {} and {}", csv.display(), json.display());
    }
    Ok(report)
}

/// The top-1 class most replies agreed on (None when no reply carried one).
pub fn most_common_top1(records: &[RequestRecord]) -> Option<i64> {
    let mut counts = std::collections::HashMap::new();
    for r in records.iter().filter(|r| r.top1 >= 0) {
        *counts.entry(r.top1).or_insert(0usize) += 1;
    }
    counts.into_iter().max_by_key(|&(_, n)| n).map(|(c, _)| c)
}

//! The answers that need no engine (validation errors, ping, echo, sink), shared by the serving
//! core's receive loop and the workers, and the reply writers both use.

use hacserve_ffi::gpu::resident::TOP5_BYTES;

use super::Outcome;
use crate::clock::realtime_ns;
use crate::protocol::{
    encode_error, ErrorCode, Header, MessageKind, ProtocolError, ReplyBuffer, ResponseBody,
    ServerTimestamps, Task, FLAG_LOGITS, HEADER_LEN, RESPONSE_BODY_LEN, TOP_K,
};

/// What a request needs: answered already (rejected, or an echo), or a worker with an engine.
pub enum Triage {
    Answered(Outcome),
    NeedsWorker(Header),
}

/// Validation and the engine-free answers, for wherever a message lands first: a transport's
/// receive loop answers errors and echoes itself (no queue hop, as eRPC's dispatch thread
/// does for small requests) and queues only what needs a worker. `error_text` receives the
/// reason of a rejection, for the log. `resident`: payload bytes that stayed in GPU memory
/// (not in `msg`; an echo or sink is never resident, see docs/gpudirect.md).
pub fn answer_without_engine<B: ReplyBuffer + ?Sized>(
    msg: &[u8],
    resident: usize,
    received_ns: u64,
    max_payload: usize,
    out: &mut B,
    error_text: &mut String,
) -> Triage {
    error_text.clear();
    let (header, payload) = match Header::decode_with_resident(msg, resident, max_payload) {
        Ok(hp) => hp,
        Err(e) => {
            let (client, request) = Header::salvage_ids(msg);
            let text = e.to_string();
            error_text.push_str(&text);
            encode_error(out, client, request, Task::Echo, e.code(), &text);
            return Triage::Answered(Outcome::Rejected(e.code()));
        }
    };
    if header.kind != MessageKind::Request {
        let e = ProtocolError::BadKind(header.kind as u8);
        return Triage::Answered(reject(&header, e.code(), &e.to_string(), out, error_text));
    }
    if header.model_id != 0 {
        let text = format!(
            "model {} is not served here (only model 0)",
            header.model_id
        );
        return Triage::Answered(reject(
            &header,
            ErrorCode::UnknownModel,
            &text,
            out,
            error_text,
        ));
    }
    if header.task.needs_engine() {
        return Triage::NeedsWorker(header);
    }
    let now = realtime_ns();
    let mut body = ResponseBody {
        timestamps: ServerTimestamps {
            received: received_ns,
            started: now,
            decoded: now,
            preprocessed: now,
            inferred: now,
            replied: now,
        },
        ..Default::default()
    };
    // Ping and sink: the payload (none for a ping) was received whole and validated; only
    // the body goes back.
    let echo = if header.task == Task::Echo {
        payload
    } else {
        &[]
    };
    Triage::Answered(write_response(&header, &mut body, Tail::Echo(echo), out))
}

pub(super) fn reject<B: ReplyBuffer + ?Sized>(
    header: &Header,
    code: ErrorCode,
    text: &str,
    out: &mut B,
    error_text: &mut String,
) -> Outcome {
    error_text.clear();
    error_text.push_str(text);
    encode_error(
        out,
        header.client_id,
        header.request_id,
        header.task,
        code,
        text,
    );
    Outcome::Rejected(code)
}

/// What follows the fixed response body.
#[derive(Clone, Copy)]
pub enum Tail<'a> {
    /// An echo's payload (empty for every other task).
    Echo(&'a [u8]),
    /// The logits, for an inference whose request set [`FLAG_LOGITS`].
    Logits(&'a [f32]),
}

impl Tail<'_> {
    fn len(&self) -> usize {
        match self {
            Tail::Echo(b) => b.len(),
            Tail::Logits(l) => l.len() * 4,
        }
    }
}

/// The tail an inference's reply carries: its logits when the request asked for them.
pub(super) fn logits_if_asked<'a>(header: &Header, logits: &'a [f32]) -> Tail<'a> {
    if header.flags & FLAG_LOGITS != 0 {
        Tail::Logits(logits)
    } else {
        Tail::Echo(&[])
    }
}

/// Writes header + body (+ echoed bytes or logits) into `out`, stamping `replied` last.
pub(super) fn write_response<B: ReplyBuffer + ?Sized>(
    header: &Header,
    body: &mut ResponseBody,
    tail: Tail<'_>,
    out: &mut B,
) -> Outcome {
    body.timestamps.replied = realtime_ns();
    let reply_len = RESPONSE_BODY_LEN + tail.len();
    let out = out.prepare(HEADER_LEN + reply_len);
    let mut h = [0u8; HEADER_LEN];
    header
        .reply(MessageKind::Response, reply_len)
        .encode(&mut h);
    out[..HEADER_LEN].copy_from_slice(&h);
    body.encode(&mut out[HEADER_LEN..]);
    let rest = &mut out[HEADER_LEN + RESPONSE_BODY_LEN..];
    match tail {
        Tail::Echo(bytes) => rest.copy_from_slice(bytes),
        Tail::Logits(logits) => {
            for (dst, l) in rest.chunks_exact_mut(4).zip(logits) {
                dst.copy_from_slice(&l.to_le_bytes());
            }
        }
    }
    Outcome::Answered {
        task: header.task,
        top1: (body.top_k > 0).then_some(body.classes[0]),
    }
}

/// The host part of a reply whose body's top-5 part (and logits) the engine wrote into the
/// request's device reply slot: the header (announcing the whole body) and the timestamps,
/// stamping `replied` last. The transport sends the device part after it.
pub(super) fn write_resident_response<B: ReplyBuffer + ?Sized>(
    header: &Header,
    ts: &mut ServerTimestamps,
    device_len: usize,
    out: &mut B,
) -> Outcome {
    ts.replied = realtime_ns();
    let body = ResponseBody {
        timestamps: *ts,
        ..Default::default()
    };
    let mut encoded = [0u8; RESPONSE_BODY_LEN];
    body.encode(&mut encoded);
    let host_body = RESPONSE_BODY_LEN - TOP5_BYTES;
    let out = out.prepare(HEADER_LEN + host_body);
    let mut h = [0u8; HEADER_LEN];
    header
        .reply(MessageKind::Response, host_body + device_len)
        .encode(&mut h);
    out[..HEADER_LEN].copy_from_slice(&h);
    out[HEADER_LEN..].copy_from_slice(&encoded[..host_body]);
    // The top-1 class is on the device; not read back for the log.
    Outcome::Answered {
        task: header.task,
        top1: None,
    }
}

/// Softmax over all logits, top-5 by score, into `body` (no allocation).
pub fn top_k_softmax(logits: &[f32], body: &mut ResponseBody) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let mut best: [(f32, u32); TOP_K] = [(f32::NEG_INFINITY, 0); TOP_K];
    for (i, &l) in logits.iter().enumerate() {
        if l > best[TOP_K - 1].0 {
            let mut j = TOP_K - 1;
            while j > 0 && best[j - 1].0 < l {
                best[j] = best[j - 1];
                j -= 1;
            }
            best[j] = (l, i as u32);
        }
    }
    let k = TOP_K.min(logits.len());
    body.top_k = k as u32;
    for (slot, (l, class)) in best.iter().take(k).enumerate() {
        body.classes[slot] = *class;
        body.scores[slot] = (l - max).exp() / sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top5_is_sorted_and_softmax_normalised() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 1000) as f32 / 100.0)
            .collect();
        let mut body = ResponseBody::default();
        top_k_softmax(&logits, &mut body);
        let mut idx: Vec<usize> = (0..1000).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let want: Vec<u32> = idx[..5].iter().map(|&i| i as u32).collect();
        assert_eq!(body.classes.to_vec(), want);
        assert!(body.scores.windows(2).all(|w| w[0] >= w[1]));
        let total: f32 = logits.iter().map(|l| (l - 9.99).exp()).sum();
        assert!((body.scores[0] - 1.0 / total).abs() < 1e-6);
    }
}

#[cfg(test)]
mod resident_tests {
    use super::*;

    #[test]
    fn a_resident_reply_holds_header_and_timestamps_and_announces_the_whole_body() {
        let header = Header::request(Task::Processed, 7, 42, 602_112);
        let mut ts = ServerTimestamps {
            received: 1,
            started: 2,
            ..Default::default()
        };
        let mut out = Vec::new();
        let outcome = write_resident_response(&header, &mut ts, TOP5_BYTES, &mut out);
        assert!(matches!(
            outcome,
            Outcome::Answered {
                task: Task::Processed,
                top1: None
            }
        ));
        assert_eq!(out.len(), HEADER_LEN + RESPONSE_BODY_LEN - TOP5_BYTES);
        // The device part completes the body: a full reply once appended.
        let mut top5 = [0u8; TOP5_BYTES];
        top5[0..4].copy_from_slice(&5u32.to_le_bytes());
        top5[8..12].copy_from_slice(&281u32.to_le_bytes());
        out.extend_from_slice(&top5);
        let (h, body) = Header::decode(&out, usize::MAX).unwrap();
        assert_eq!((h.kind, h.request_id), (MessageKind::Response, 42));
        let body = ResponseBody::decode(body).unwrap();
        assert_eq!((body.top_k, body.classes[0]), (5, 281));
        assert_eq!((body.timestamps.received, body.timestamps.started), (1, 2));
        assert!(body.timestamps.replied >= ts.started);
    }
}

#[cfg(test)]
mod sink_tests {
    use super::*;

    fn request(task: Task, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; HEADER_LEN];
        let mut h = [0u8; HEADER_LEN];
        Header::request(task, 7, 42, payload.len()).encode(&mut h);
        m.copy_from_slice(&h);
        m.extend_from_slice(payload);
        m
    }

    fn answer(msg: &[u8], max_payload: usize) -> (Triage, Vec<u8>) {
        let (mut out, mut text) = (Vec::new(), String::new());
        let t = answer_without_engine(msg, 0, 1, max_payload, &mut out, &mut text);
        (t, out)
    }

    #[test]
    fn sink_is_answered_without_the_payload_echo_with_it() {
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        for (task, back) in [(Task::Sink, 0), (Task::Echo, payload.len())] {
            let (t, out) = answer(&request(task, &payload), 1 << 20);
            assert!(
                matches!(t, Triage::Answered(Outcome::Answered { task: got, top1: None }) if got == task),
                "{task:?}"
            );
            assert_eq!(out.len(), HEADER_LEN + RESPONSE_BODY_LEN + back, "{task:?}");
            let (h, body) = Header::decode(&out, usize::MAX).unwrap();
            assert_eq!(h.kind, MessageKind::Response);
            assert_eq!((h.task, h.client_id, h.request_id), (task, 7, 42));
            assert_eq!(body.len(), RESPONSE_BODY_LEN + back);
            assert_eq!(&body[RESPONSE_BODY_LEN..], &payload[..back]);
            assert_eq!(ResponseBody::decode(body).unwrap().top_k, 0);
        }
        // Validated like any request: the payload limit and its length still apply.
        let (t, _) = answer(&request(Task::Sink, &payload), 1000);
        assert!(matches!(
            t,
            Triage::Answered(Outcome::Rejected(ErrorCode::PayloadTooLarge))
        ));
        let mut short = request(Task::Sink, &payload);
        short.pop();
        let (t, _) = answer(&short, 1 << 20);
        assert!(matches!(
            t,
            Triage::Answered(Outcome::Rejected(ErrorCode::Truncated))
        ));
    }
}

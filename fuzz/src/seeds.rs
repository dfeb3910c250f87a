//! The generated seed inputs of the wire and rdma_handshake targets, made with the real
//! encoders, so each seed starts the fuzzer at a message the server or client really sees.
//! Written to fuzz/corpus/<target>/ by `cargo test --test fuzz_corpus -- --ignored
//! write_generated_seeds`; the test `generated_seeds_are_committed` fails when the
//! committed files differ from what this makes (a protocol change needs new seeds).

use hacserve_runtime::contract::Refusal;
use hacserve_runtime::protocol::{
    encode_error, ErrorCode, Header, MessageKind, RawImage, ResponseBody, ServerTimestamps, Task,
    FLAG_LOGITS, FLAG_PRIORITY, HEADER_LEN, RESPONSE_BODY_LEN,
};
use hacserve_runtime::transport::rdma::{
    encode_reject, response_slot_size, AcceptReply, ConnectRequest, MIN_SLOT_SIZE,
};

/// (target, file name, bytes) of every generated seed.
pub fn generated() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, bytes) in wire() {
        out.push(("wire", format!("{name}.bin"), bytes));
    }
    for (name, bytes) in rdma_handshake() {
        out.push(("rdma_handshake", format!("{name}.bin"), bytes));
    }
    out
}

fn message(header: Header, payload: &[u8]) -> Vec<u8> {
    let mut h = [0u8; HEADER_LEN];
    header.encode(&mut h);
    let mut m = h.to_vec();
    m.extend_from_slice(payload);
    m
}

fn wire() -> Vec<(&'static str, Vec<u8>)> {
    // The smallest JPEG of the jpeg corpus, as an image request's payload.
    let jpeg: &[u8] = include_bytes!("../corpus/jpeg/one_pixel.jpg");
    let echo: Vec<u8> = (0..48u8).collect();
    let req = |task, payload: &[u8]| Header::request(task, 7, 1001, payload.len());
    let mut seeds = vec![
        ("infer_jpeg", message(req(Task::Jpeg, jpeg), jpeg)),
        (
            "preprocess_jpeg",
            message(req(Task::Preprocess, jpeg), jpeg),
        ),
        // The right tensor is 602,112 bytes: a short one keeps the seed small.
        (
            "infer_tensor_short",
            message(req(Task::Processed, &[0; 64]), &[0; 64]),
        ),
        ("echo", message(req(Task::Echo, &echo), &echo)),
        ("echo_empty", message(req(Task::Echo, &[]), &[])),
        ("sink", message(req(Task::Sink, &echo), &echo)),
        ("ping", message(req(Task::Ping, &[]), &[])),
    ];
    // A 4x3 raw image (width, height, BGR pixels), and the same asking for logits.
    let raw = RawImage::encode(4, 3, &[90; 36]);
    seeds.push(("raw_4x3", message(req(Task::Raw, &raw), &raw)));
    let mut logits = req(Task::Raw, &raw);
    logits.flags = FLAG_LOGITS;
    seeds.push(("raw_4x3_logits", message(logits, &raw)));
    let mut priority = req(Task::Echo, &echo);
    priority.flags = FLAG_PRIORITY;
    seeds.push(("echo_priority", message(priority, &echo)));
    let mut other_model = req(Task::Jpeg, jpeg);
    other_model.model_id = 3;
    seeds.push(("infer_unknown_model", message(other_model, jpeg)));
    // Declares more than it carries, and less.
    let mut truncated = message(req(Task::Echo, &echo), &echo);
    truncated.truncate(HEADER_LEN + 10);
    seeds.push(("echo_truncated", truncated));
    let mut trailing = message(req(Task::Echo, &echo), &echo);
    trailing.extend_from_slice(b"extra");
    seeds.push(("echo_trailing", trailing));
    // Replies sent to a server: a response and an error.
    let body = ResponseBody {
        timestamps: ServerTimestamps {
            received: 1,
            started: 2,
            decoded: 3,
            preprocessed: 4,
            inferred: 5,
            replied: 6,
        },
        top_k: 5,
        classes: [1, 2, 3, 4, 5],
        scores: [0.5, 0.2, 0.1, 0.1, 0.1],
    };
    let mut encoded = [0u8; RESPONSE_BODY_LEN];
    body.encode(&mut encoded);
    let reply = req(Task::Jpeg, &[]).reply(MessageKind::Response, RESPONSE_BODY_LEN);
    seeds.push(("response", message(reply, &encoded)));
    let mut error = Vec::new();
    encode_error(
        &mut error,
        7,
        1001,
        Task::Jpeg,
        ErrorCode::BadImage,
        "JPEG decode failed",
    );
    seeds.push(("error", error));
    seeds
}

fn rdma_handshake() -> Vec<(&'static str, Vec<u8>)> {
    let slot = 2 << 20;
    let connect = ConnectRequest {
        flags: 0,
        client_id: 7,
        slot_size: slot,
        depth: 64,
        resp_slot_size: response_slot_size(slot),
        resp_addr: 0x7f00_1234_5000,
        resp_rkey: 0x1234,
        total_clients: 1,
    };
    let smallest = ConnectRequest {
        flags: 0,
        slot_size: MIN_SLOT_SIZE,
        depth: 1,
        resp_slot_size: response_slot_size(MIN_SLOT_SIZE),
        ..connect
    };
    let too_deep = ConnectRequest {
        flags: 0,
        depth: 256,
        ..connect
    };
    // IB CM pads private data with zeros up to its maximum.
    let mut padded = connect.encode().to_vec();
    padded.resize(56, 0);
    let accept = AcceptReply {
        flags: 0,
        slot_size: slot,
        depth: 64,
        req_addr: 0x7f00_5678_9000,
        req_rkey: 0x5678,
        max_payload: slot - HEADER_LEN as u32,
    };
    let mut accept_padded = accept.encode().to_vec();
    accept_padded.resize(196, 0);
    let too_large = Refusal::RingTooLarge {
        depth: 256,
        slot_size: slot,
        max_depth: 64,
        max_slot: slot,
    };
    vec![
        ("connect", connect.encode().to_vec()),
        ("connect_smallest_ring", smallest.encode().to_vec()),
        ("connect_too_deep", too_deep.encode().to_vec()),
        ("connect_padded", padded),
        ("accept", accept.encode().to_vec()),
        ("accept_padded", accept_padded),
        ("reject_too_large", encode_reject(&too_large)),
        (
            "reject_utf8",
            encode_reject(&Refusal::Other("anneau refusé: « trop grand »".into())),
        ),
    ]
}

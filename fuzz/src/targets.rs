//! The fuzz targets as plain functions over one input's bytes. The afl binaries in
//! fuzz/src/bin/ call them in afl's loop; the main workspace's tests/fuzz_seeds.rs runs every
//! committed seed and every regression input through them without afl (so CI exercises
//! this code). A target panics (afl: a crash) when the code under test panics or when a
//! property every answer must have does not hold; errors the code returns are normal.

use hacserve_runtime::contract::Refusal;
use hacserve_runtime::pipeline::{answer_without_engine, Outcome, Triage};
use hacserve_runtime::preprocess::{Preprocessor, MAX_IMAGE_PIXELS, TENSOR_LEN};
use hacserve_runtime::protocol::{
    decode_error, ErrorCode, Header, MessageKind, ResponseBody, Task, DEFAULT_MAX_PAYLOAD,
    HEADER_LEN, RESPONSE_BODY_LEN,
};
use hacserve_runtime::server::account::overloaded_reply;
use hacserve_runtime::transport::rdma::{
    check_geometry, decode_imm, decode_reject, encode_imm, encode_reject, response_slot_size,
    AcceptReply, ConnectRequest, ACCEPT_LEN, CONNECT_LEN, IMM_LEN_MASK, MAX_REJECT_TEXT,
    REJECT_TRAILER_LEN,
};

/// The target names, as the binaries, the corpus folders and scripts/fuzz.sh spell them.
pub const TARGETS: [&str; 3] = ["wire", "rdma_handshake", "jpeg"];

/// Runs target `name` on `data` with fresh state; `false` for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "wire" => wire(&mut Wire::new(), data),
        "rdma_handshake" => rdma_handshake(data),
        "jpeg" => {
            jpeg(&mut Jpeg::new(), data);
        }
        _ => return false,
    }
    true
}

/// What the wire target reuses between inputs, as a server's receive loop does.
pub struct Wire {
    out: Vec<u8>,
    error_text: String,
    overload: Vec<u8>,
}

impl Wire {
    pub fn new() -> Self {
        Wire {
            out: Vec::new(),
            error_text: String::new(),
            overload: Vec::new(),
        }
    }
}

impl Default for Wire {
    fn default() -> Self {
        Self::new()
    }
}

/// One message as a server's transport hands it to the serving core (a ZeroMQ frame's
/// bytes, or the bytes of an RDMA slot the immediate announced): the receive loop's triage
/// at the default and at a small payload limit (an RDMA ring's), the Overloaded answer
/// for a full queue, and the client's decoding of whatever reply the server wrote.
pub fn wire(state: &mut Wire, msg: &[u8]) {
    let decoded = Header::decode(msg, DEFAULT_MAX_PAYLOAD);
    if let Ok((header, payload)) = decoded {
        // What decodes re-encodes to the same header bytes (flags and ids included).
        let mut again = [0u8; HEADER_LEN];
        header.encode(&mut again);
        assert_eq!(
            again[..],
            msg[..HEADER_LEN],
            "header re-encodes differently"
        );
        assert_eq!(payload.len(), header.payload_len as usize);
        assert_eq!(msg.len(), HEADER_LEN + payload.len());
    }
    let salvaged = Header::salvage_ids(msg);
    for max_payload in [DEFAULT_MAX_PAYLOAD, 4064] {
        let triage = answer_without_engine(
            msg,
            0,
            1,
            max_payload,
            &mut state.out,
            &mut state.error_text,
        );
        match triage {
            Triage::NeedsWorker(header) => {
                let (want, _) = Header::decode(msg, max_payload).expect("queued but invalid");
                assert_eq!(header, want);
                assert_eq!(header.kind, MessageKind::Request);
                assert!(header.task.needs_engine());
            }
            Triage::Answered(outcome) => {
                let reply = check_reply(&state.out, salvaged);
                match (outcome, reply) {
                    (Outcome::Rejected(code), Reply::Error(got)) => {
                        assert_eq!(code as u32, got, "reply code differs from outcome");
                        assert!(!state.error_text.is_empty(), "rejection without a reason");
                    }
                    (Outcome::Answered { task, top1 }, Reply::Response(len)) => {
                        assert!(!task.needs_engine());
                        assert_eq!(top1, None);
                        let (_, payload) = decoded.as_ref().expect("answered but invalid");
                        let echoed = if task == Task::Echo { payload.len() } else { 0 };
                        assert_eq!(len, RESPONSE_BODY_LEN + echoed);
                        assert_eq!(
                            &state.out[HEADER_LEN + RESPONSE_BODY_LEN..],
                            &payload[..echoed]
                        );
                    }
                    (o, r) => panic!("outcome {o:?} with reply {r:?}"),
                }
            }
        }
    }
    overloaded_reply(msg, "the server's queue is full", &mut state.overload);
    assert!(matches!(
        check_reply(&state.overload, salvaged),
        Reply::Error(c) if c == ErrorCode::Overloaded as u32
    ));
    // The client decodes any reply it gets (a hostile or broken server's too).
    if let Ok((header, body)) = decoded {
        match header.kind {
            MessageKind::Response => {
                let _ = ResponseBody::decode(body);
            }
            MessageKind::Error => {
                let _ = decode_error(body);
            }
            MessageKind::Request => {}
        }
    }
}

#[derive(Debug)]
enum Reply {
    /// An error reply's code.
    Error(u32),
    /// A response's payload length.
    Response(usize),
}

/// A reply the server wrote must be a valid message to the sender's ids.
fn check_reply(out: &[u8], (client, request): (u32, u64)) -> Reply {
    let (h, body) = Header::decode(out, usize::MAX).expect("server wrote an invalid reply");
    assert_eq!((h.client_id, h.request_id), (client, request));
    match h.kind {
        MessageKind::Error => {
            let (code, _) = decode_error(body).expect("error reply without a code");
            assert!(ErrorCode::from_u32(code).is_some(), "unknown code {code}");
            Reply::Error(code)
        }
        MessageKind::Response => {
            ResponseBody::decode(body).expect("response body does not decode");
            Reply::Response(body.len())
        }
        MessageKind::Request => panic!("server replied with a request"),
    }
}

/// The rdma_cm private data both ends parse: the server's decode of a connect request
/// and its ring limits, the client's decode of an accept and of a reject's reason, and the
/// immediate that announces each request.
pub fn rdma_handshake(data: &[u8]) {
    // rdma_server's defaults (--ring-depth 64 --slot-size 2 MiB) bound what it accepts.
    const SERVER_MAX_DEPTH: u32 = 64;
    const SERVER_MAX_SLOT: u32 = 2 << 20;
    if let Ok(req) = ConnectRequest::decode(data) {
        let mut want = [0u8; CONNECT_LEN];
        want.copy_from_slice(&data[..CONNECT_LEN]);
        want[6..8].fill(0); // flags: not kept
        assert_eq!(req.encode(), want, "connect request re-encodes differently");
        assert_eq!(check_geometry(req.depth, req.slot_size), Ok(()));
        assert!(req.resp_slot_size >= response_slot_size(req.slot_size));
        assert!(req.resp_slot_size <= IMM_LEN_MASK);
        let too_large = req.depth > SERVER_MAX_DEPTH || req.slot_size > SERVER_MAX_SLOT;
        if too_large {
            let e = Refusal::RingTooLarge {
                depth: req.depth,
                slot_size: req.slot_size,
                max_depth: SERVER_MAX_DEPTH,
                max_slot: SERVER_MAX_SLOT,
            };
            check_reject(&e);
        }
    } else if let Err(e) = ConnectRequest::decode(data) {
        // The server sends the reason back in the reject.
        check_reject(&Refusal::BadHandshake(e.to_string()));
    }
    if let Ok(acc) = AcceptReply::decode(data) {
        let mut want = [0u8; ACCEPT_LEN];
        want.copy_from_slice(&data[..ACCEPT_LEN]);
        want[6..8].fill(0);
        assert_eq!(acc.encode(), want, "accept reply re-encodes differently");
        assert_eq!(check_geometry(acc.depth, acc.slot_size), Ok(()));
    }
    if let Some(reason) = decode_reject(data) {
        check_reject(&reason);
    }
    // The immediate of a request write: whatever 32 bits arrive split into a slot and a
    // length that re-pack to the same bits.
    if data.len() >= 4 {
        let imm = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let (slot, len) = decode_imm(imm);
        assert_eq!(encode_imm(slot, len), Some(imm));
    }
}

/// A reason survives the reject's private data, cut to its limit at a char boundary.
fn check_reject(reason: &Refusal) {
    let packed = encode_reject(reason);
    assert!(packed.len() <= 8 + MAX_REJECT_TEXT + REJECT_TRAILER_LEN);
    let back = decode_reject(&packed).expect("own reject does not decode");
    if back != *reason {
        // Only a text cut at the limit may differ, and only by its end.
        let (text, got) = (reason.to_string(), back.to_string());
        assert!(
            text.len() > MAX_REJECT_TEXT,
            "reject reason changed: {reason:?} -> {back:?}"
        );
        assert!(
            text.starts_with(&got),
            "reject text changed: {text:?} -> {got:?}"
        );
    }
}

/// What the JPEG target reuses between inputs, as a CPU worker does: one preprocessor
/// (buffers grow to the largest image so far, up to the server's pixel limit) and the
/// engine input tensor it writes.
pub struct Jpeg {
    pre: Preprocessor,
    tensor: Vec<f32>,
}

impl Jpeg {
    pub fn new() -> Self {
        Jpeg {
            pre: Preprocessor::new(MAX_IMAGE_PIXELS),
            tensor: vec![0.0; TENSOR_LEN],
        }
    }
}

impl Default for Jpeg {
    fn default() -> Self {
        Self::new()
    }
}

/// A request payload through the CPU backend's stages (pipeline's cpu_stages): decode,
/// then resize/crop/normalise into the model input. A decoded image must preprocess, to
/// finite values. Returns whether the image decoded.
pub fn jpeg(state: &mut Jpeg, data: &[u8]) -> bool {
    let Ok((width, height)) = state.pre.decode(data) else {
        return false;
    };
    assert!(width > 0 && height > 0 && width * height <= MAX_IMAGE_PIXELS);
    if let Err(e) = state.pre.preprocess(&mut state.tensor) {
        panic!("{width}x{height} image decoded but did not preprocess: {e}");
    }
    assert!(
        state.tensor.iter().all(|v| v.is_finite()),
        "non-finite input value"
    );
    true
}

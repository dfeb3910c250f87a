//! Wire protocol v2: a fixed 32-byte little-endian header followed by the payload.
//! Transport-neutral: the same bytes travel as one ZeroMQ frame or in one RDMA ring slot.
//! `docs/protocol.md` is the normative description; the constants here are its source.

use thiserror::Error;

pub const MAGIC: u32 = u32::from_le_bytes(*b"HACS");
/// Version 2 renumbered the tasks to the original's (0 ping, 1 raw, 2 processed) and added
/// [`FLAG_LOGITS`]; a version 1 peer is answered `BadVersion`.
pub const VERSION: u16 = 2;
pub const HEADER_LEN: usize = 32;
/// Default upper bound on a request payload; servers make it configurable.
pub const DEFAULT_MAX_PAYLOAD: usize = 16 << 20;
/// Top-k carried in a response.
pub const TOP_K: usize = 5;
/// Fixed part of a response payload (timestamps + top-k); an echo reply appends the request's
/// payload after it.
pub const RESPONSE_BODY_LEN: usize = 96;
/// Longest error text sent back (longer messages are cut at a char boundary).
pub const MAX_ERROR_TEXT: usize = 200;

/// Flag bit: the client asks for the high-priority lane (honoured when the server allows it).
pub const FLAG_PRIORITY: u32 = 1;
/// Flag bit: the reply to an inference carries the model's logits ([`LOGITS_LEN`] bytes,
/// f32 LE) after the fixed body, as the original replies (its reply is the 4000 B of logits).
pub const FLAG_LOGITS: u32 = 2;
const KNOWN_FLAGS: u32 = FLAG_PRIORITY | FLAG_LOGITS;
/// Classes of the models served (ImageNet): the logits a [`FLAG_LOGITS`] reply carries.
pub const NUM_CLASSES: usize = 1000;
/// Bytes of the logits a [`FLAG_LOGITS`] reply appends.
pub const LOGITS_LEN: usize = NUM_CLASSES * 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageKind {
    Request = 1,
    Response = 2,
    Error = 3,
}

impl MessageKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Request),
            2 => Some(Self::Response),
            3 => Some(Self::Error),
            _ => None,
        }
    }
}

/// What the server does with a request: the task byte of the header. 0-2 are the
/// original system's tasks with its numbers (3, its MIXTURE, is a client mode that sends
/// each request with one of 0-2, never a task on the wire: see [`Workload`]); ours follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Task {
    /// Header only in; the fixed response body (timestamps, no classes) out at once.
    Ping = 0,
    /// Client-decoded pixels in ([`RawImage`]: width, height, BGR bytes): resize, crop,
    /// normalise, infer; top-5 out.
    Raw = 1,
    /// Client-preprocessed tensor in (1x3x224x224 f32 LE, NCHW): infer only; top-5 out.
    Processed = 2,
    /// JPEG in: decode + preprocess + infer, top-5 out.
    Jpeg = 4,
    /// JPEG in: decode + preprocess only (no inference); timestamps out.
    Preprocess = 5,
    /// Transport only: the server answers at once with the payload echoed back.
    Echo = 6,
    /// Transport only, one way: the server accepts the payload, discards it and answers at
    /// once with the response body alone (a bandwidth test whose replies stay small).
    Sink = 7,
}

/// The task number the original system calls MIXTURE: a client mode, not a wire task.
pub const MIXTURE_NUMBER: u8 = 3;

impl Task {
    pub const ALL: [Task; 7] = [
        Task::Ping,
        Task::Raw,
        Task::Processed,
        Task::Jpeg,
        Task::Preprocess,
        Task::Echo,
        Task::Sink,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Task::Ping => "ping",
            Task::Raw => "raw",
            Task::Processed => "processed",
            Task::Jpeg => "jpeg",
            Task::Preprocess => "preprocess",
            Task::Echo => "echo",
            Task::Sink => "sink",
        }
    }

    /// Tasks answered by the transport's receive loop itself, without an engine.
    pub fn needs_engine(self) -> bool {
        !matches!(self, Task::Ping | Task::Echo | Task::Sink)
    }

    /// Tasks whose reply carries classes (and, with [`FLAG_LOGITS`], the logits).
    pub fn infers(self) -> bool {
        matches!(self, Task::Raw | Task::Processed | Task::Jpeg)
    }
}

/// What `-t` names: one task for every request, or the original's MIXTURE (3), which
/// rotates through ping, raw and processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Single(Task),
    Mixture,
}

/// The tasks [`Workload::Mixture`] rotates through, in order (the original's 0, 1, 2).
pub const MIXTURE_TASKS: [Task; 3] = [Task::Ping, Task::Raw, Task::Processed];

/// `-t`'s accepted spellings, for error messages and `--help`.
pub const TASK_CHOICES: &str =
    "0|ping, 1|raw, 2|processed, 3|mixture, 4|jpeg, 5|preprocess, 6|echo, 7|sink";

impl Workload {
    /// Parses `-t`: a number (the original's 0-3, ours after) or a name. The names of
    /// protocol v1 are refused with the new spelling, since their numbers now mean
    /// other tasks.
    pub fn parse(s: &str) -> Result<Workload, String> {
        let s = s.trim();
        if s == "mixture" || s == MIXTURE_NUMBER.to_string() {
            return Ok(Workload::Mixture);
        }
        let by_number = s.parse::<u8>().ok().and_then(Task::from_u8);
        if let Some(t) = by_number.or_else(|| Task::ALL.into_iter().find(|t| t.name() == s)) {
            return Ok(Workload::Single(t));
        }
        let renamed = match s {
            "infer" => Some("4|jpeg (task 0 is now ping, as in the original)"),
            "infer-tensor" => Some("2|processed (task 1 is now raw, as in the original)"),
            _ => None,
        };
        Err(match renamed {
            Some(new) => format!("task {s:?} was renamed: use {new}"),
            None => format!("unknown task {s:?}: use {TASK_CHOICES}"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::Single(t) => t.name(),
            Workload::Mixture => "mixture",
        }
    }

    /// The task of request number `i` (mixture: ping, raw, processed, ping, ...).
    pub fn task_of(self, i: usize) -> Task {
        match self {
            Workload::Single(t) => t,
            Workload::Mixture => MIXTURE_TASKS[i % MIXTURE_TASKS.len()],
        }
    }

    /// The distinct tasks this workload sends.
    pub fn tasks(self) -> &'static [Task] {
        match self {
            Workload::Single(t) => {
                let i = Task::ALL.iter().position(|x| *x == t).unwrap_or(0);
                &Task::ALL[i..i + 1]
            }
            Workload::Mixture => &MIXTURE_TASKS,
        }
    }
}

/// Error codes carried by [`MessageKind::Error`] messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    BadMagic = 1,
    BadVersion = 2,
    BadKind = 3,
    BadTask = 4,
    Truncated = 5,
    PayloadTooLarge = 6,
    BadFlags = 7,
    UnknownModel = 8,
    BadImage = 9,
    BadTensor = 10,
    Overloaded = 11,
    Internal = 12,
    /// A proxy or the balancer got no answer from its backend within its deadline.
    Timeout = 13,
    /// A proxy or the balancer has no live backend for the request, or lost the one it was
    /// sent to before the answer came (it may or may not have been processed there).
    Unavailable = 14,
}

impl ErrorCode {
    pub fn from_u32(v: u32) -> Option<Self> {
        use ErrorCode::*;
        [
            BadMagic,
            BadVersion,
            BadKind,
            BadTask,
            Truncated,
            PayloadTooLarge,
            BadFlags,
            UnknownModel,
            BadImage,
            BadTensor,
            Overloaded,
            Internal,
            Timeout,
            Unavailable,
        ]
        .into_iter()
        .find(|c| *c as u32 == v)
    }
}

/// Why a message was rejected. Each maps to one [`ErrorCode`] sent back to the peer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    BadVersion(u16),
    #[error("unknown message kind {0}")]
    BadKind(u8),
    #[error("{}", bad_task_text(*.0))]
    BadTask(u8),
    #[error("message truncated: {got} bytes, {want} expected")]
    Truncated { got: usize, want: usize },
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("unknown flag bits {0:#x}")]
    BadFlags(u32),
    #[error("message has {extra} bytes beyond its declared payload")]
    TrailingBytes { extra: usize },
    #[error("response body malformed: {0}")]
    BadBody(&'static str),
}

impl ProtocolError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::BadMagic(_) => ErrorCode::BadMagic,
            ProtocolError::BadVersion(_) => ErrorCode::BadVersion,
            ProtocolError::BadKind(_) => ErrorCode::BadKind,
            ProtocolError::BadTask(_) => ErrorCode::BadTask,
            ProtocolError::Truncated { .. }
            | ProtocolError::TrailingBytes { .. }
            | ProtocolError::BadBody(_) => ErrorCode::Truncated,
            ProtocolError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ProtocolError::BadFlags(_) => ErrorCode::BadFlags,
        }
    }
}

fn bad_task_text(task: u8) -> String {
    if task == MIXTURE_NUMBER {
        "task 3 (mixture) is a client mode, not a request's task: send each request as 0 (ping), 1 (raw) or 2 (processed)".into()
    } else {
        format!("unknown task {task}: tasks are {TASK_CHOICES} (3 only as a client mode)")
    }
}

/// The payload of a [`Task::Raw`] request, as the original sends it: width and height
/// (u64 LE each), then `width * height * 3` bytes of pixels, BGR, interleaved, row by row
/// (OpenCV's `Mat` of the client-decoded image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawImage<'a> {
    pub width: usize,
    pub height: usize,
    pub bgr: &'a [u8],
}

/// Bytes before a raw image's pixels.
pub const RAW_HEADER_LEN: usize = 16;

/// Why a raw payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RawImageError {
    #[error("raw payload of {0} bytes is shorter than its 16-byte width and height")]
    NoDimensions(usize),
    #[error("raw image of {width}x{height} has an empty side")]
    Empty { width: u64, height: u64 },
    #[error("raw image of {width}x{height} is above the limit of {max} pixels")]
    TooLarge { width: u64, height: u64, max: usize },
    #[error(
        "raw image of {width}x{height} needs {want} pixel bytes (BGR), the payload carries {got}"
    )]
    Length {
        width: usize,
        height: usize,
        want: usize,
        got: usize,
    },
}

impl<'a> RawImage<'a> {
    /// Parses and checks a raw payload: pixels exactly `width * height * 3`, at most
    /// `max_pixels` pixels (checked before the product is used, so it cannot overflow).
    pub fn parse(payload: &'a [u8], max_pixels: usize) -> Result<Self, RawImageError> {
        let (width, height) = Self::check_dims(payload, payload.len(), max_pixels)?;
        let bgr = &payload[RAW_HEADER_LEN..];
        Ok(RawImage { width, height, bgr })
    }

    /// The checks of [`Self::parse`] from the payload's first bytes (`head`, at least the
    /// 16 of width and height when the payload has them) and its length alone, for a payload
    /// whose pixels stay elsewhere (GPU memory): (width, height).
    pub fn check_dims(
        head: &[u8],
        payload_len: usize,
        max_pixels: usize,
    ) -> Result<(usize, usize), RawImageError> {
        if payload_len < RAW_HEADER_LEN || head.len() < RAW_HEADER_LEN {
            return Err(RawImageError::NoDimensions(payload_len));
        }
        let (width, height) = (u64_at(head, 0), u64_at(head, 8));
        if width == 0 || height == 0 {
            return Err(RawImageError::Empty { width, height });
        }
        let too_large = RawImageError::TooLarge {
            width,
            height,
            max: max_pixels,
        };
        let pixels = width
            .checked_mul(height)
            .filter(|p| *p <= max_pixels as u64)
            .ok_or_else(|| too_large.clone())?;
        let want = usize::try_from(pixels)
            .ok()
            .and_then(|p| p.checked_mul(3))
            .ok_or(too_large)?;
        let (width, height) = (width as usize, height as usize);
        let got = payload_len - RAW_HEADER_LEN;
        if got != want {
            return Err(RawImageError::Length {
                width,
                height,
                want,
                got,
            });
        }
        Ok((width, height))
    }

    /// The payload for `width x height` BGR pixels.
    pub fn encode(width: usize, height: usize, bgr: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(RAW_HEADER_LEN + bgr.len());
        out.extend_from_slice(&(width as u64).to_le_bytes());
        out.extend_from_slice(&(height as u64).to_le_bytes());
        out.extend_from_slice(bgr);
        out
    }
}

/// The fixed header. `payload_len` must equal the bytes that follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: MessageKind,
    pub task: Task,
    pub client_id: u32,
    pub model_id: u32,
    pub request_id: u64,
    pub payload_len: u32,
    pub flags: u32,
}

impl Header {
    pub fn request(task: Task, client_id: u32, request_id: u64, payload_len: usize) -> Self {
        Header {
            kind: MessageKind::Request,
            task,
            client_id,
            model_id: 0,
            request_id,
            payload_len: payload_len as u32,
            flags: 0,
        }
    }

    /// The header of the answer to `self`, same ids and task.
    pub fn reply(&self, kind: MessageKind, payload_len: usize) -> Self {
        Header {
            kind,
            payload_len: payload_len as u32,
            flags: 0,
            ..*self
        }
    }

    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6] = self.kind as u8;
        out[7] = self.task as u8;
        out[8..12].copy_from_slice(&self.client_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.model_id.to_le_bytes());
        out[16..24].copy_from_slice(&self.request_id.to_le_bytes());
        out[24..28].copy_from_slice(&self.payload_len.to_le_bytes());
        out[28..32].copy_from_slice(&self.flags.to_le_bytes());
    }

    /// Parses and validates a whole message (header + payload); returns the header and payload.
    pub fn decode(msg: &[u8], max_payload: usize) -> Result<(Header, &[u8]), ProtocolError> {
        Self::decode_with_resident(msg, 0, max_payload)
    }

    /// As [`Self::decode`] for a message whose last `resident` payload bytes are held
    /// elsewhere (GPU memory): `msg` has the header and the payload's first part (usually
    /// nothing), and the header must announce exactly both parts.
    pub fn decode_with_resident(
        msg: &[u8],
        resident: usize,
        max_payload: usize,
    ) -> Result<(Header, &[u8]), ProtocolError> {
        if msg.len() < HEADER_LEN {
            return Err(ProtocolError::Truncated {
                got: msg.len(),
                want: HEADER_LEN,
            });
        }
        let magic = u32_at(msg, 0);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([msg[4], msg[5]]);
        if version != VERSION {
            return Err(ProtocolError::BadVersion(version));
        }
        let kind = MessageKind::from_u8(msg[6]).ok_or(ProtocolError::BadKind(msg[6]))?;
        let task = Task::from_u8(msg[7]).ok_or(ProtocolError::BadTask(msg[7]))?;
        let payload_len = u32_at(msg, 24);
        let flags = u32_at(msg, 28);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(ProtocolError::BadFlags(flags & !KNOWN_FLAGS));
        }
        let len = payload_len as usize;
        if len > max_payload {
            return Err(ProtocolError::PayloadTooLarge {
                len,
                max: max_payload,
            });
        }
        let body = &msg[HEADER_LEN..];
        let have = body.len() + resident;
        if have < len {
            return Err(ProtocolError::Truncated {
                got: HEADER_LEN + have,
                want: HEADER_LEN + len,
            });
        }
        if have > len {
            return Err(ProtocolError::TrailingBytes { extra: have - len });
        }
        let header = Header {
            kind,
            task,
            client_id: u32_at(msg, 8),
            model_id: u32_at(msg, 12),
            request_id: u64_at(msg, 16),
            payload_len,
            flags,
        };
        Ok((header, body))
    }

    /// Best-effort ids from a message that failed validation, so its error reply can still be
    /// matched by the client: (client_id, request_id), zero where the bytes are missing.
    pub fn salvage_ids(msg: &[u8]) -> (u32, u64) {
        let client = if msg.len() >= 12 { u32_at(msg, 8) } else { 0 };
        let request = if msg.len() >= 24 { u64_at(msg, 16) } else { 0 };
        (client, request)
    }

    /// The flags word of a message whose header was not decoded (forwarded untouched); 0
    /// when the header is incomplete.
    pub fn salvage_flags(msg: &[u8]) -> u32 {
        if msg.len() >= HEADER_LEN {
            u32_at(msg, 28)
        } else {
            0
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Server-side stage timestamps (CLOCK_REALTIME, ns), in pipeline order. Stages a task skips
/// repeat the previous timestamp, so every stage duration is >= 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerTimestamps {
    /// Whole message received by the server's transport.
    pub received: u64,
    /// A worker took it off the queue.
    pub started: u64,
    pub decoded: u64,
    pub preprocessed: u64,
    pub inferred: u64,
    /// Reply handed to the transport.
    pub replied: u64,
}

impl ServerTimestamps {
    fn as_array(&self) -> [u64; 6] {
        [
            self.received,
            self.started,
            self.decoded,
            self.preprocessed,
            self.inferred,
            self.replied,
        ]
    }
}

/// The fixed part of a successful response.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResponseBody {
    pub timestamps: ServerTimestamps,
    /// Number of valid entries in `classes`/`scores` (0 for tasks without inference).
    pub top_k: u32,
    pub classes: [u32; TOP_K],
    /// Softmax probabilities.
    pub scores: [f32; TOP_K],
}

impl ResponseBody {
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..RESPONSE_BODY_LEN];
        for (i, t) in self.timestamps.as_array().iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&t.to_le_bytes());
        }
        out[48..52].copy_from_slice(&self.top_k.to_le_bytes());
        out[52..56].copy_from_slice(&0u32.to_le_bytes());
        for i in 0..TOP_K {
            out[56 + i * 4..60 + i * 4].copy_from_slice(&self.classes[i].to_le_bytes());
            out[76 + i * 4..80 + i * 4].copy_from_slice(&self.scores[i].to_le_bytes());
        }
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        if body.len() < RESPONSE_BODY_LEN {
            return Err(ProtocolError::BadBody(
                "shorter than the fixed response body",
            ));
        }
        let t: Vec<u64> = (0..6).map(|i| u64_at(body, i * 8)).collect();
        let top_k = u32_at(body, 48);
        if top_k as usize > TOP_K {
            return Err(ProtocolError::BadBody("top_k above 5"));
        }
        let mut r = ResponseBody {
            timestamps: ServerTimestamps {
                received: t[0],
                started: t[1],
                decoded: t[2],
                preprocessed: t[3],
                inferred: t[4],
                replied: t[5],
            },
            top_k,
            ..Default::default()
        };
        for i in 0..TOP_K {
            r.classes[i] = u32_at(body, 56 + i * 4);
            r.scores[i] = f32::from_bits(u32_at(body, 76 + i * 4));
        }
        Ok(r)
    }

    /// Where the replied timestamp sits, so a transport can stamp it just before sending.
    pub const REPLIED_OFFSET: usize = 40;
}

/// A copy of a message's header bytes (zero-padded if it is shorter), kept for the
/// accounting when the message itself is handed to the transport.
pub fn header_bytes(msg: &[u8]) -> [u8; HEADER_LEN] {
    let mut head = [0u8; HEADER_LEN];
    let n = msg.len().min(HEADER_LEN);
    head[..n].copy_from_slice(&msg[..n]);
    head
}

/// (client_id, request_id, task) of an encoded message, for logs; zeros if it is too short.
pub fn ids_of(msg: &[u8]) -> (u32, u64, u8) {
    if msg.len() < HEADER_LEN {
        return (0, 0, 0);
    }
    let (c, r) = Header::salvage_ids(msg);
    (c, r, msg[7])
}

/// Encodes an error message (header + code + text) into `out`; returns its length.
pub fn encode_error<B: ReplyBuffer + ?Sized>(
    out: &mut B,
    client_id: u32,
    request_id: u64,
    task: Task,
    code: ErrorCode,
    text: &str,
) {
    let mut cut = text.len().min(MAX_ERROR_TEXT);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let text = &text.as_bytes()[..cut];
    let mut header = Header::request(task, client_id, request_id, 4 + text.len());
    header.kind = MessageKind::Error;
    let mut h = [0u8; HEADER_LEN];
    header.encode(&mut h);
    let out = out.prepare(HEADER_LEN + 4 + text.len());
    out[..HEADER_LEN].copy_from_slice(&h);
    out[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&(code as u32).to_le_bytes());
    out[HEADER_LEN + 4..].copy_from_slice(text);
}

/// Where a reply is encoded: a reused `Vec`, or a transport's own send buffer so the reply is
/// written once and sent without another copy.
pub trait ReplyBuffer {
    /// Room for exactly `len` bytes; the caller overwrites all of them.
    fn prepare(&mut self, len: usize) -> &mut [u8];
    /// The reply as prepared and written.
    fn bytes(&self) -> &[u8];
}

impl ReplyBuffer for Vec<u8> {
    fn prepare(&mut self, len: usize) -> &mut [u8] {
        // Only growth is zero-filled: every byte is overwritten by the caller anyway.
        self.resize(len, 0);
        &mut self[..]
    }
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Parses the payload of an error message into (code, text).
pub fn decode_error(payload: &[u8]) -> Result<(u32, String), ProtocolError> {
    if payload.len() < 4 {
        return Err(ProtocolError::BadBody(
            "error payload shorter than its code",
        ));
    }
    Ok((
        u32_at(payload, 0),
        String::from_utf8_lossy(&payload[4..]).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(payload: &[u8]) -> Vec<u8> {
        let mut h = [0u8; HEADER_LEN];
        Header::request(Task::Jpeg, 3, 77, payload.len()).encode(&mut h);
        let mut v = h.to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn a_resident_payload_counts_towards_the_announced_length() {
        let msg = request(b"abc");
        let head = &msg[..HEADER_LEN];
        let (h, p) = Header::decode_with_resident(head, 3, 16).unwrap();
        assert_eq!((h.payload_len, p.len()), (3, 0));
        assert!(matches!(
            Header::decode_with_resident(head, 2, 16),
            Err(ProtocolError::Truncated { got: 34, want: 35 })
        ));
        assert_eq!(
            Header::decode_with_resident(head, 4, 16),
            Err(ProtocolError::TrailingBytes { extra: 1 })
        );
        assert!(matches!(
            Header::decode_with_resident(head, 3, 2),
            Err(ProtocolError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn header_round_trip_and_layout() {
        let msg = request(b"abc");
        assert_eq!(&msg[0..4], b"HACS");
        assert_eq!(&msg[4..6], &[2, 0]);
        let (h, p) = Header::decode(&msg, 16).unwrap();
        assert_eq!(h.kind, MessageKind::Request);
        assert_eq!(h.task, Task::Jpeg);
        assert_eq!((h.client_id, h.request_id, h.payload_len), (3, 77, 3));
        assert_eq!(p, b"abc");
    }

    #[test]
    fn every_field_is_validated() {
        let good = request(b"abcd");
        let mut m = good.clone();
        m[0] = b'X';
        assert!(matches!(
            Header::decode(&m, 99),
            Err(ProtocolError::BadMagic(_))
        ));
        let mut m = good.clone();
        m[4] = 1;
        assert_eq!(Header::decode(&m, 99), Err(ProtocolError::BadVersion(1)));
        let mut m = good.clone();
        m[6] = 9;
        assert_eq!(Header::decode(&m, 99), Err(ProtocolError::BadKind(9)));
        let mut m = good.clone();
        m[7] = 8;
        assert_eq!(Header::decode(&m, 99), Err(ProtocolError::BadTask(8)));
        m[7] = MIXTURE_NUMBER;
        let e = Header::decode(&m, 99).unwrap_err();
        assert_eq!(e, ProtocolError::BadTask(3));
        assert!(e.to_string().contains("client mode"), "{e}");
        for (byte, task) in [
            (0, Task::Ping),
            (1, Task::Raw),
            (2, Task::Processed),
            (7, Task::Sink),
        ] {
            m[7] = byte;
            assert_eq!(Header::decode(&m, 99).unwrap().0.task, task);
        }
        let mut m = good.clone();
        m[28] = FLAG_LOGITS as u8;
        assert_eq!(Header::decode(&m, 99).unwrap().0.flags, FLAG_LOGITS);
        m[28] = 0x80;
        assert_eq!(Header::decode(&m, 99), Err(ProtocolError::BadFlags(0x80)));
        assert_eq!(
            Header::decode(&good[..10], 99),
            Err(ProtocolError::Truncated { got: 10, want: 32 })
        );
        assert_eq!(
            Header::decode(&good[..34], 99),
            Err(ProtocolError::Truncated { got: 34, want: 36 })
        );
        let mut m = good.clone();
        m.push(0);
        assert_eq!(
            Header::decode(&m, 99),
            Err(ProtocolError::TrailingBytes { extra: 1 })
        );
        assert_eq!(
            Header::decode(&good, 3),
            Err(ProtocolError::PayloadTooLarge { len: 4, max: 3 })
        );
        assert_eq!(Header::salvage_ids(&good), (3, 77));
        assert_eq!(Header::salvage_ids(&good[..5]), (0, 0));
        let mut flagged = good.clone();
        flagged[28..32].copy_from_slice(&FLAG_PRIORITY.to_le_bytes());
        assert_eq!(Header::salvage_flags(&flagged), FLAG_PRIORITY);
        assert_eq!(
            Header::salvage_flags(&flagged),
            Header::decode(&flagged, 99).unwrap().0.flags
        );
        assert_eq!(Header::salvage_flags(&flagged[..HEADER_LEN - 1]), 0);
    }

    #[test]
    fn response_body_round_trip() {
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
            classes: [9, 8, 7, 6, 5],
            scores: [0.5, 0.2, 0.1, 0.1, 0.05],
        };
        let mut buf = [0u8; RESPONSE_BODY_LEN];
        body.encode(&mut buf);
        assert_eq!(u64_at(&buf, ResponseBody::REPLIED_OFFSET), 6);
        assert_eq!(ResponseBody::decode(&buf).unwrap(), body);
        assert!(ResponseBody::decode(&buf[..95]).is_err());
    }

    #[test]
    fn error_message_round_trip_and_text_cut() {
        let mut out = Vec::new();
        let long = "é".repeat(300);
        encode_error(&mut out, 4, 5, Task::Echo, ErrorCode::BadImage, &long);
        let (h, p) = Header::decode(&out, 1024).unwrap();
        assert_eq!(h.kind, MessageKind::Error);
        assert_eq!((h.client_id, h.request_id), (4, 5));
        let (code, text) = decode_error(p).unwrap();
        assert_eq!(ErrorCode::from_u32(code), Some(ErrorCode::BadImage));
        assert!(text.len() <= MAX_ERROR_TEXT && text.starts_with('é'));
    }

    #[test]
    fn task_numbers_are_the_originals_and_old_names_are_refused() {
        assert_eq!(Workload::parse("0"), Ok(Workload::Single(Task::Ping)));
        assert_eq!(Workload::parse("1"), Ok(Workload::Single(Task::Raw)));
        assert_eq!(Workload::parse("2"), Ok(Workload::Single(Task::Processed)));
        assert_eq!(Workload::parse("3"), Ok(Workload::Mixture));
        assert_eq!(Workload::parse("mixture"), Ok(Workload::Mixture));
        for t in Task::ALL {
            assert_eq!(Workload::parse(t.name()), Ok(Workload::Single(t)));
            assert_eq!(
                Workload::parse(&(t as u8).to_string()),
                Ok(Workload::Single(t))
            );
        }
        let e = Workload::parse("infer").unwrap_err();
        assert!(e.contains("4|jpeg"), "{e}");
        let e = Workload::parse("infer-tensor").unwrap_err();
        assert!(e.contains("2|processed"), "{e}");
        let e = Workload::parse("9").unwrap_err();
        assert!(e.contains("0|ping") && e.contains("7|sink"), "{e}");
        let m = Workload::Mixture;
        let seq: Vec<Task> = (0..4).map(|i| m.task_of(i)).collect();
        assert_eq!(seq, [Task::Ping, Task::Raw, Task::Processed, Task::Ping]);
        assert_eq!(Workload::Single(Task::Echo).tasks(), &[Task::Echo]);
    }

    #[test]
    fn raw_payload_is_checked_before_its_size_is_trusted() {
        let bgr = vec![7u8; 4 * 3 * 3];
        let payload = RawImage::encode(4, 3, &bgr);
        assert_eq!(payload.len(), RAW_HEADER_LEN + 36);
        let raw = RawImage::parse(&payload, 100).unwrap();
        assert_eq!((raw.width, raw.height, raw.bgr.len()), (4, 3, 36));
        assert_eq!(
            RawImage::parse(&payload[..15], 100),
            Err(RawImageError::NoDimensions(15))
        );
        assert!(matches!(
            RawImage::parse(&payload[..payload.len() - 1], 100),
            Err(RawImageError::Length {
                want: 36,
                got: 35,
                ..
            })
        ));
        assert!(matches!(
            RawImage::parse(&payload, 11),
            Err(RawImageError::TooLarge { .. })
        ));
        let huge = RawImage::encode(usize::MAX, 3, &[]);
        assert!(matches!(
            RawImage::parse(&huge, usize::MAX),
            Err(RawImageError::TooLarge { .. })
        ));
        let empty = RawImage::encode(0, 3, &[]);
        assert!(matches!(
            RawImage::parse(&empty, 100),
            Err(RawImageError::Empty { .. })
        ));
    }
}

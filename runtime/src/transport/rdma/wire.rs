//! The byte layouts shared by both ends of the RDMA transport: immediates and the
//! connection private data of the rdma_cm handshake (docs/rdma.md has the diagrams).

use crate::contract::Refusal;
use crate::protocol::{HEADER_LEN, LOGITS_LEN, RESPONSE_BODY_LEN};

/// rdma_server's default port (the original system's).
pub const DEFAULT_PORT: u16 = 20079;
/// Version of the RDMA handshake (private data) and ring protocol.
pub const RDMA_PROTOCOL_VERSION: u16 = 2;
/// Immediate: slot index in the top 8 bits, message length in the low 24.
pub const IMM_LEN_BITS: u32 = 24;
pub const IMM_LEN_MASK: u32 = (1 << IMM_LEN_BITS) - 1;
/// Largest ring depth (requests in flight per client): what 8 slot bits can name.
pub const MAX_DEPTH: u32 = 1 << (32 - IMM_LEN_BITS);
/// Largest request slot: 8 MiB, so that a response slot (slot + 96 bytes of response
/// body) still fits the 24 length bits.
pub const MAX_SLOT_SIZE: u32 = 8 << 20;
/// Smallest slot: room for the header and any error message.
pub const MIN_SLOT_SIZE: u32 = 256;
/// Private data magics: connect request, accept, reject.
pub const CONNECT_MAGIC: [u8; 4] = *b"HCRQ";
pub const ACCEPT_MAGIC: [u8; 4] = *b"HCRA";
pub const REJECT_MAGIC: [u8; 4] = *b"HCRJ";
/// Bytes of the connect request (IB CM carries at most 56 with rdma_cm's header).
pub const CONNECT_LEN: usize = 40;
/// Bytes of the accept reply (at most 196).
pub const ACCEPT_LEN: usize = 32;
/// Reject private data: at most 148 bytes over IB CM.
pub const MAX_REJECT_LEN: usize = 148;
/// The typed reason after the text: a u16 code and four u32 figures.
pub const REJECT_TRAILER_LEN: usize = 18;
/// Longest reject reason text: what is left of the 148 bytes after the 8-byte head and the
/// trailer.
pub const MAX_REJECT_TEXT: usize = MAX_REJECT_LEN - 8 - REJECT_TRAILER_LEN;

/// Handshake flag (ConnectRequest and AcceptReply `flags`, bit 0): the memory-polled fast
/// path. The client sets it to ask, the server sets it in its accept to grant; a peer that
/// does not know it leaves it 0 (a server of the first v2 builds never reads the client's
/// flags and always answers 0), so both ends then keep to WRITE_WITH_IMM.
pub const FLAG_FAST_PATH: u16 = 1;
/// The fast path's completion word: the last 4 bytes of every request and response slot,
/// reserved on a fast-path connection (messages never reach them).
pub const FAST_WORD_LEN: usize = 4;
/// Longest message sent on the fast path (larger ones take WRITE_WITH_IMM on the same
/// connection): the "small" requests and replies whose latency a receive and a completion
/// on each side dominate (a 4 KiB echo's request and reply fit).
pub const FAST_MAX_LEN: usize = 8192;

/// The fast path's completion word of a message: the slot's generation (1..=255, the how
/// many-th use of that slot, modulo 255) in the top 8 bits, the message length in the low 24,
/// as the immediate carries the slot. Little-endian in memory.
pub fn fast_word(generation: u8, len: u32) -> Option<u32> {
    (generation != 0 && len <= IMM_LEN_MASK).then_some(((generation as u32) << IMM_LEN_BITS) | len)
}

/// The generation after `g`: 1, 2, ..., 255, 1, ... (0 is never used: zeroed memory and a
/// cleared word never match).
pub fn next_generation(g: u8) -> u8 {
    if g == u8::MAX {
        1
    } else {
        g + 1
    }
}

/// The length in a completion word if it carries generation `generation`.
pub fn fast_word_len(word: u32, generation: u8) -> Option<u32> {
    (word >> IMM_LEN_BITS == generation as u32 && generation != 0).then_some(word & IMM_LEN_MASK)
}

/// The response slot a fast-path client offers: room for every reply plus the completion
/// word, a multiple of 4 (the word is aligned). Saturates like [`response_slot_size`].
pub fn fast_response_slot_size(slot_size: u32) -> u32 {
    response_slot_size(slot_size)
        .saturating_add(FAST_WORD_LEN as u32)
        .saturating_add(3)
        & !3
}

/// Whether rings of this geometry can carry the fast path: both slot sizes multiples of 4
/// (so every slot's last word is aligned) and the response slot room for every reply and the
/// word.
pub fn fast_path_fits(slot_size: u32, resp_slot_size: u32) -> bool {
    slot_size % 4 == 0
        && resp_slot_size % 4 == 0
        && slot_size as usize > FAST_WORD_LEN + HEADER_LEN
        && resp_slot_size >= response_slot_size(slot_size).saturating_add(FAST_WORD_LEN as u32)
}

/// The response slot size a client must offer for request slots of `slot_size`: room
/// for the largest reply, an echo of a full slot or an inference with its logits. Saturates: a slot size read off the wire
/// may be anything (a saturated result fails every check against the immediate's bits).
pub fn response_slot_size(slot_size: u32) -> u32 {
    // Room for the longest non-echo reply too: an inference's with its logits
    // (FLAG_LOGITS), whatever the request's own size.
    let logits_reply = (HEADER_LEN + RESPONSE_BODY_LEN + LOGITS_LEN) as u32;
    slot_size
        .saturating_add(RESPONSE_BODY_LEN as u32)
        .max(logits_reply)
}

/// Packs (slot, length) into an immediate; `None` if either does not fit its bits.
pub fn encode_imm(slot: u32, len: u32) -> Option<u32> {
    (slot < MAX_DEPTH && len <= IMM_LEN_MASK).then_some((slot << IMM_LEN_BITS) | len)
}

/// Splits an immediate into (slot, length); the caller validates both against the ring.
pub fn decode_imm(imm: u32) -> (u32, u32) {
    (imm >> IMM_LEN_BITS, imm & IMM_LEN_MASK)
}

/// A ring outside what the immediate's bits and the slot layout can carry. The one check of
/// ring geometry: the CLIs, [`crate::transport::rdma::RdmaClient::connect`] and the handshake
/// decode all call [`check_geometry`]; the texts name the options that set the two values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("--ring-depth must be 1..={MAX_DEPTH}, not {0}")]
    Depth(u32),
    #[error("--slot-size must be {MIN_SLOT_SIZE}..={MAX_SLOT_SIZE} bytes, not {0}")]
    SlotSize(u32),
}

/// Checks a ring of `depth` slots of `slot_size` bytes against the wire format's limits.
pub fn check_geometry(depth: u32, slot_size: u32) -> Result<(), GeometryError> {
    if depth == 0 || depth > MAX_DEPTH {
        return Err(GeometryError::Depth(depth));
    }
    if !(MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&slot_size) {
        return Err(GeometryError::SlotSize(slot_size));
    }
    Ok(())
}

/// Why a handshake was refused or could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("private data of {got} bytes, at least {want} expected")]
    Short { got: usize, want: usize },
    #[error("bad magic {0:02x?}: not a hacserve RDMA peer")]
    BadMagic([u8; 4]),
    #[error("RDMA protocol version {0}, this build speaks {RDMA_PROTOCOL_VERSION}")]
    BadVersion(u16),
    /// The peer's ring: the message names the peer's option.
    #[error("the peer's ring: {0}")]
    BadGeometry(#[from] GeometryError),
    #[error("response slot of {got} bytes, at least {want} needed")]
    BadResponseSlot { got: u32, want: u32 },
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn check_head(b: &[u8], magic: [u8; 4], want: usize) -> Result<(), HandshakeError> {
    if b.len() < want {
        return Err(HandshakeError::Short { got: b.len(), want });
    }
    let m = [b[0], b[1], b[2], b[3]];
    if m != magic {
        return Err(HandshakeError::BadMagic(m));
    }
    let v = u16_at(b, 4);
    if v != RDMA_PROTOCOL_VERSION {
        return Err(HandshakeError::BadVersion(v));
    }
    Ok(())
}

fn check_ring(depth: u32, slot_size: u32, resp_slot: u32) -> Result<(), HandshakeError> {
    check_geometry(depth, slot_size)?;
    let want = response_slot_size(slot_size);
    if resp_slot < want || resp_slot > super::wire::IMM_LEN_MASK {
        return Err(HandshakeError::BadResponseSlot {
            got: resp_slot,
            want,
        });
    }
    Ok(())
}

/// Client -> server, in `rdma_connect`'s private data (40 bytes, little-endian):
///
/// | off | size | field |
/// |----:|----:|---|
/// | 0 | 4 | magic `HCRQ` |
/// | 4 | 2 | version (2) |
/// | 6 | 2 | flags (bit 0: [`FLAG_FAST_PATH`] asked) |
/// | 8 | 4 | client_id |
/// | 12 | 4 | slot_size (request slot bytes) |
/// | 16 | 4 | depth (slots = requests in flight) |
/// | 20 | 4 | resp_slot_size |
/// | 24 | 8 | resp_addr (client's response ring) |
/// | 32 | 4 | resp_rkey |
/// | 36 | 4 | total_clients (the run's client count, `-c`: names the server's log folder) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRequest {
    /// [`FLAG_FAST_PATH`]; unknown bits are ignored.
    pub flags: u16,
    pub client_id: u32,
    pub slot_size: u32,
    pub depth: u32,
    pub resp_slot_size: u32,
    pub resp_addr: u64,
    pub resp_rkey: u32,
    pub total_clients: u32,
}

impl ConnectRequest {
    pub fn encode(&self) -> [u8; CONNECT_LEN] {
        let mut b = [0u8; CONNECT_LEN];
        b[0..4].copy_from_slice(&CONNECT_MAGIC);
        b[4..6].copy_from_slice(&RDMA_PROTOCOL_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.client_id.to_le_bytes());
        b[12..16].copy_from_slice(&self.slot_size.to_le_bytes());
        b[16..20].copy_from_slice(&self.depth.to_le_bytes());
        b[20..24].copy_from_slice(&self.resp_slot_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.resp_addr.to_le_bytes());
        b[32..36].copy_from_slice(&self.resp_rkey.to_le_bytes());
        b[36..40].copy_from_slice(&self.total_clients.to_le_bytes());
        b
    }

    /// Parses and validates; trailing bytes are ignored (IB CM pads private data).
    pub fn decode(b: &[u8]) -> Result<Self, HandshakeError> {
        check_head(b, CONNECT_MAGIC, CONNECT_LEN)?;
        let r = ConnectRequest {
            flags: u16_at(b, 6),
            client_id: u32_at(b, 8),
            slot_size: u32_at(b, 12),
            depth: u32_at(b, 16),
            resp_slot_size: u32_at(b, 20),
            resp_addr: u64_at(b, 24),
            resp_rkey: u32_at(b, 32),
            total_clients: u32_at(b, 36),
        };
        check_ring(r.depth, r.slot_size, r.resp_slot_size)?;
        Ok(r)
    }
}

/// Server -> client, in `rdma_accept`'s private data (32 bytes, little-endian):
///
/// | off | size | field |
/// |----:|----:|---|
/// | 0 | 4 | magic `HCRA` |
/// | 4 | 2 | version (2) |
/// | 6 | 2 | flags (bit 0: [`FLAG_FAST_PATH`] granted) |
/// | 8 | 4 | slot_size (granted; = requested) |
/// | 12 | 4 | depth (granted; = requested) |
/// | 16 | 8 | req_addr (this client's request ring) |
/// | 24 | 4 | req_rkey |
/// | 28 | 4 | max_payload (server's payload limit for this ring) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptReply {
    /// [`FLAG_FAST_PATH`] when granted; unknown bits are ignored.
    pub flags: u16,
    pub slot_size: u32,
    pub depth: u32,
    pub req_addr: u64,
    pub req_rkey: u32,
    pub max_payload: u32,
}

impl AcceptReply {
    pub fn encode(&self) -> [u8; ACCEPT_LEN] {
        let mut b = [0u8; ACCEPT_LEN];
        b[0..4].copy_from_slice(&ACCEPT_MAGIC);
        b[4..6].copy_from_slice(&RDMA_PROTOCOL_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.slot_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.depth.to_le_bytes());
        b[16..24].copy_from_slice(&self.req_addr.to_le_bytes());
        b[24..28].copy_from_slice(&self.req_rkey.to_le_bytes());
        b[28..32].copy_from_slice(&self.max_payload.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, HandshakeError> {
        check_head(b, ACCEPT_MAGIC, ACCEPT_LEN)?;
        let r = AcceptReply {
            flags: u16_at(b, 6),
            slot_size: u32_at(b, 8),
            depth: u32_at(b, 12),
            req_addr: u64_at(b, 16),
            req_rkey: u32_at(b, 24),
            max_payload: u32_at(b, 28),
        };
        check_ring(r.depth, r.slot_size, response_slot_size(r.slot_size))?;
        Ok(r)
    }
}

/// Server -> client, in `rdma_reject`'s private data: magic `HCRJ`, version, a u16 text
/// length, that many bytes of UTF-8 reason (what a client of the first version prints: it
/// reads no further), then the typed reason: a u16 code and four u32 figures (0 = none).
/// IB CM pads private data with zeros, so code 0 means "text only".
///
/// | code | reason | figures |
/// |---:|---|---|
/// | 1 | bad handshake | (text) |
/// | 2 | ring too large | depth, slot_size, max_depth, max_slot |
/// | 3 | connection limit | max |
/// | 4 | pinned-memory budget | need_kib, free_kib, budget_kib |
/// | 5 | set-up failed | (text) |
pub fn encode_reject(reason: &Refusal) -> Vec<u8> {
    let text = reason.to_string();
    let mut cut = text.len().min(MAX_REJECT_TEXT);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let (code, figures) = match *reason {
        Refusal::BadHandshake(_) => (1u16, [0; 4]),
        Refusal::RingTooLarge {
            depth,
            slot_size,
            max_depth,
            max_slot,
        } => (2, [depth, slot_size, max_depth, max_slot]),
        Refusal::ConnectionLimit { max } => (3, [max, 0, 0, 0]),
        Refusal::PinnedBudget {
            need_kib,
            free_kib,
            budget_kib,
        } => (4, [need_kib, free_kib, budget_kib, 0]),
        Refusal::SetupFailed(_) => (5, [0; 4]),
        Refusal::Other(_) => (0, [0; 4]),
    };
    let mut b = Vec::with_capacity(8 + cut + REJECT_TRAILER_LEN);
    b.extend_from_slice(&REJECT_MAGIC);
    b.extend_from_slice(&RDMA_PROTOCOL_VERSION.to_le_bytes());
    b.extend_from_slice(&(cut as u16).to_le_bytes());
    b.extend_from_slice(&text.as_bytes()[..cut]);
    b.extend_from_slice(&code.to_le_bytes());
    for f in figures {
        b.extend_from_slice(&f.to_le_bytes());
    }
    b
}

/// The reason of a hacserve reject, if the private data is one: typed when the trailer is
/// there and its code known, else [`Refusal::Other`] with the text.
pub fn decode_reject(b: &[u8]) -> Option<Refusal> {
    if b.len() < 8 || b[0..4] != REJECT_MAGIC {
        return None;
    }
    let n = (u16_at(b, 6) as usize).min(b.len() - 8);
    let text = String::from_utf8_lossy(&b[8..8 + n]).into_owned();
    let t = 8 + n;
    if b.len() < t + REJECT_TRAILER_LEN {
        return Some(Refusal::Other(text));
    }
    let f = |i: usize| u32_at(b, t + 2 + 4 * i);
    // The text of a text-carrying reason is its Display: strip the prefix it adds back off.
    let inner = |prefix: &str| text.strip_prefix(prefix).unwrap_or(&text).to_string();
    Some(match u16_at(b, t) {
        1 => Refusal::BadHandshake(inner("bad handshake: ")),
        2 => Refusal::RingTooLarge {
            depth: f(0),
            slot_size: f(1),
            max_depth: f(2),
            max_slot: f(3),
        },
        3 => Refusal::ConnectionLimit { max: f(0) },
        4 => Refusal::PinnedBudget {
            need_kib: f(0),
            free_kib: f(1),
            budget_kib: f(2),
        },
        5 => Refusal::SetupFailed(inner("the server could not set the connection up: ")),
        _ => Refusal::Other(text),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_packs_slot_high_and_length_low() {
        assert_eq!(encode_imm(0, 0), Some(0));
        assert_eq!(encode_imm(1, 5), Some(0x0100_0005));
        assert_eq!(encode_imm(255, IMM_LEN_MASK), Some(u32::MAX));
        assert_eq!(encode_imm(256, 1), None);
        assert_eq!(encode_imm(0, 1 << 24), None);
        assert_eq!(decode_imm(0x0300_1234), (3, 0x1234));
        for (s, l) in [(0, 32), (7, 61_338), (255, 8 << 20)] {
            assert_eq!(decode_imm(encode_imm(s, l).unwrap()), (s, l));
        }
        // Every response slot length fits the immediate.
        assert!(response_slot_size(MAX_SLOT_SIZE) <= IMM_LEN_MASK);
        assert_eq!(MAX_DEPTH, 256);
    }

    #[test]
    fn fast_path_words_flags_and_geometry() {
        // The word: generation high, length low; generation 0 never matches.
        assert_eq!(fast_word(1, 64), Some(0x0100_0040));
        assert_eq!(fast_word(0, 64), None);
        assert_eq!(fast_word(3, IMM_LEN_MASK + 1), None);
        assert_eq!(fast_word_len(0x0100_0040, 1), Some(64));
        assert_eq!(fast_word_len(0x0100_0040, 2), None, "a stale generation");
        assert_eq!(
            fast_word_len(0, 0),
            None,
            "zeroed memory is never a message"
        );
        assert_eq!(fast_word_len(0x0000_0040, 0), None);
        // Generations cycle through 1..=255; a slot's previous word always differs.
        let mut g = 1u8;
        for _ in 0..600 {
            let n = next_generation(g);
            assert_ne!(n, g);
            assert_ne!(n, 0);
            g = n;
        }
        assert_eq!(next_generation(255), 1);
        // Geometry: aligned slots, the response slot with room for the word.
        for slot in [256u32, 4096, 61_440, 65_536, MAX_SLOT_SIZE] {
            let resp = fast_response_slot_size(slot);
            assert!(fast_path_fits(slot, resp), "{slot}");
            assert!(resp % 4 == 0 && resp <= IMM_LEN_MASK, "{slot}");
            assert!(
                !fast_path_fits(slot, response_slot_size(slot)),
                "no room for the word"
            );
        }
        assert!(
            !fast_path_fits(4098, fast_response_slot_size(4098)),
            "unaligned slot"
        );
        // The flags travel in both directions; unknown bits are kept, not refused.
        let r = ConnectRequest {
            flags: FLAG_FAST_PATH | 0x8000,
            ..req()
        };
        let b = r.encode();
        assert_eq!(&b[6..8], &[1, 0x80]);
        assert_eq!(ConnectRequest::decode(&b), Ok(r));
        // A peer that never sets it: bytes 6..8 zero, as before the fast path.
        assert_eq!(ConnectRequest::decode(&req().encode()).unwrap().flags, 0);
        let a = AcceptReply {
            flags: FLAG_FAST_PATH,
            slot_size: 4096,
            depth: 2,
            req_addr: 1,
            req_rkey: 2,
            max_payload: 4060,
        };
        let ab = a.encode();
        assert_eq!(&ab[6..8], &[1, 0]);
        assert_eq!(AcceptReply::decode(&ab), Ok(a));
    }

    #[test]
    fn geometry_limits_and_messages() {
        assert_eq!(check_geometry(1, MIN_SLOT_SIZE), Ok(()));
        assert_eq!(check_geometry(MAX_DEPTH, MAX_SLOT_SIZE), Ok(()));
        assert_eq!(check_geometry(0, 4096), Err(GeometryError::Depth(0)));
        assert_eq!(check_geometry(257, 4096), Err(GeometryError::Depth(257)));
        assert_eq!(check_geometry(4, 255), Err(GeometryError::SlotSize(255)));
        let e = check_geometry(4, MAX_SLOT_SIZE + 1).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("--slot-size must be 256..=8388608 bytes"));
        let e = check_geometry(0, 4096).unwrap_err();
        assert!(e.to_string().starts_with("--ring-depth must be 1..=256"));
    }

    fn req() -> ConnectRequest {
        ConnectRequest {
            flags: 0,
            client_id: 7,
            slot_size: 65536,
            depth: 16,
            resp_slot_size: response_slot_size(65536),
            resp_addr: 0x1122_3344_5566_7788,
            resp_rkey: 0xaabb_ccdd,
            total_clients: 3,
        }
    }

    #[test]
    fn connect_request_layout_and_validation() {
        let b = req().encode();
        assert_eq!(b.len(), CONNECT_LEN);
        const { assert!(CONNECT_LEN <= 56, "IB CM REQ private data limit") };
        assert_eq!(&b[0..4], b"HCRQ");
        assert_eq!(&b[4..6], &[2, 0]);
        assert_eq!(&b[8..12], &7u32.to_le_bytes());
        assert_eq!(&b[12..16], &65536u32.to_le_bytes());
        assert_eq!(&b[16..20], &16u32.to_le_bytes());
        assert_eq!(&b[24..32], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[32..36], &0xaabb_ccddu32.to_le_bytes());
        assert_eq!(&b[36..40], &3u32.to_le_bytes());
        assert_eq!(ConnectRequest::decode(&b), Ok(req()));
        // IB CM pads private data with zeros: trailing bytes are ignored.
        let mut padded = b.to_vec();
        padded.resize(56, 0);
        assert_eq!(ConnectRequest::decode(&padded), Ok(req()));
        assert_eq!(
            ConnectRequest::decode(&b[..20]),
            Err(HandshakeError::Short { got: 20, want: 40 })
        );
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            ConnectRequest::decode(&bad),
            Err(HandshakeError::BadMagic(_))
        ));
        let mut bad = b;
        bad[4] = 1;
        assert_eq!(
            ConnectRequest::decode(&bad),
            Err(HandshakeError::BadVersion(1))
        );
        for (depth, slot, resp, want) in [
            (0, 65536, response_slot_size(65536), "depth"),
            (257, 65536, response_slot_size(65536), "depth"),
            (4, 100, 1000, "slot"),
            (4, MAX_SLOT_SIZE + 1, u32::MAX, "slot"),
            (4, 65536, 65536, "resp"),
        ] {
            let r = ConnectRequest {
                depth,
                slot_size: slot,
                resp_slot_size: resp,
                ..req()
            };
            let e = ConnectRequest::decode(&r.encode()).unwrap_err();
            let ok = match want {
                "depth" => matches!(e, HandshakeError::BadGeometry(GeometryError::Depth(_))),
                "slot" => matches!(e, HandshakeError::BadGeometry(GeometryError::SlotSize(_))),
                _ => matches!(e, HandshakeError::BadResponseSlot { .. }),
            };
            assert!(ok, "{want}: {e}");
        }
    }

    #[test]
    fn accept_and_reject_layouts() {
        let a = AcceptReply {
            flags: 0,
            slot_size: 4096,
            depth: 8,
            req_addr: 0xdead_beef_0000,
            req_rkey: 42,
            max_payload: 4064,
        };
        let b = a.encode();
        assert_eq!(b.len(), ACCEPT_LEN);
        assert_eq!(&b[0..4], b"HCRA");
        assert_eq!(&b[16..24], &0xdead_beef_0000u64.to_le_bytes());
        assert_eq!(&b[24..28], &42u32.to_le_bytes());
        assert_eq!(AcceptReply::decode(&b), Ok(a));
        let mut padded = b.to_vec();
        padded.resize(196, 0);
        assert_eq!(AcceptReply::decode(&padded), Ok(a));
        assert!(AcceptReply::decode(&req().encode()).is_err());
        // A slot size near u32::MAX from a hostile server is refused, not an overflow
        // (found by the rdma_handshake fuzz target: fuzz/regressions/rdma_handshake/).
        for slot_size in [u32::MAX, u32::MAX - RESPONSE_BODY_LEN as u32 + 1] {
            let huge = AcceptReply { slot_size, ..a }.encode();
            assert_eq!(
                AcceptReply::decode(&huge),
                Err(HandshakeError::BadGeometry(GeometryError::SlotSize(
                    slot_size
                )))
            );
        }
        assert_eq!(response_slot_size(u32::MAX), u32::MAX);

        let limit = Refusal::ConnectionLimit { max: 2 };
        let r = encode_reject(&limit);
        assert_eq!(&r[0..4], b"HCRJ");
        assert!(r.len() <= MAX_REJECT_LEN);
        assert_eq!(decode_reject(&r), Some(limit.clone()));
        // A first-version client reads the length and the text only: the whole reason.
        let n = u16::from_le_bytes([r[6], r[7]]) as usize;
        assert_eq!(
            std::str::from_utf8(&r[8..8 + n]).unwrap(),
            limit.to_string()
        );
        // IB CM pads to 148 bytes with zeros.
        let mut padded = r.clone();
        padded.resize(MAX_REJECT_LEN, 0);
        assert_eq!(decode_reject(&padded), Some(limit));
        for reason in [
            Refusal::BadHandshake("bad magic".into()),
            Refusal::RingTooLarge {
                depth: 128,
                slot_size: 4 << 20,
                max_depth: 64,
                max_slot: 2 << 20,
            },
            Refusal::PinnedBudget {
                need_kib: 262_200,
                free_kib: 1024,
                budget_kib: 4 << 20,
            },
            Refusal::SetupFailed("ibv_reg_mr: Cannot allocate memory".into()),
        ] {
            let r = encode_reject(&reason);
            assert!(r.len() <= MAX_REJECT_LEN, "{reason}");
            assert_eq!(decode_reject(&r), Some(reason));
        }
        // An older server's reject: text only (its zero padding reads as code 0).
        let mut old = b"HCRJ\x01\x00\x0e\x00ring too large".to_vec();
        assert_eq!(
            decode_reject(&old),
            Some(Refusal::Other("ring too large".into()))
        );
        old.resize(MAX_REJECT_LEN, 0);
        assert_eq!(
            decode_reject(&old),
            Some(Refusal::Other("ring too large".into()))
        );
        let long = Refusal::SetupFailed("é".repeat(200));
        let r = encode_reject(&long);
        assert!(r.len() <= MAX_REJECT_LEN);
        match decode_reject(&r) {
            Some(Refusal::SetupFailed(t)) => assert!(t.chars().all(|c| c == 'é'), "{t}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(decode_reject(b"nothing here"), None);
        assert_eq!(decode_reject(&[]), None);
    }
}

//! afl target: rdma_cm private data and immediates (docs/fuzzing.md).
fn main() {
    afl::fuzz_nohook!(|data: &[u8]| {
        hacserve_fuzz::targets::rdma_handshake(data);
    });
}

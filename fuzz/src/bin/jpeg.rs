//! afl target: a JPEG payload through the CPU decode and preprocess (docs/fuzzing.md).
fn main() {
    let mut state = hacserve_fuzz::targets::Jpeg::new();
    // No panic hook: the preprocessor catches a decoder panic itself (the request gets a
    // BadImage reply, as in the server); a panic that escapes it aborts (afl counts it).
    afl::fuzz_nohook!(|data: &[u8]| {
        hacserve_fuzz::targets::jpeg(&mut state, data);
    });
}

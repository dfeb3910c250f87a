//! afl target: one request message as the serving core receives it (docs/fuzzing.md).
fn main() {
    let mut state = hacserve_fuzz::targets::Wire::new();
    // No panic hook: a panic the code under test catches itself is not a crash; one that
    // escapes the closure aborts (afl counts it).
    afl::fuzz_nohook!(|data: &[u8]| {
        hacserve_fuzz::targets::wire(&mut state, data);
    });
}

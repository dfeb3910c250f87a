//! Every `unsafe` binding of hacserve, and nothing else. Each `unsafe` block carries a
//! `// SAFETY:` line. Higher layers (runtime/, bins/) are safe Rust.

pub mod signal;
pub mod zmq;

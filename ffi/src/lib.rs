//! Every `unsafe` binding of hacserve, and nothing else. Each `unsafe` block carries a
//! `// SAFETY:` line. Higher layers (runtime/, bins/) are safe Rust.

mod dl;
pub mod rdmacm;
pub mod signal;
pub mod verbs;
pub mod zmq;

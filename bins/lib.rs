//! The CLI layer the role binaries in bins/ share: option groups defined once and generated
//! into each role's argh struct ([`cli_args!`]), and the main bodies of the roles that come
//! in pairs (two servers, two clients, two proxies), generic over the transport.

#![forbid(unsafe_code)]

pub mod cli;

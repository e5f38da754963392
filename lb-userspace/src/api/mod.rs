//! The admin API: HTTP with JSON bodies over a Unix socket, as Docker's own
//! API is, so `curl --unix-socket /run/lb/lb.sock` works and the CLI is a
//! thin client of the same API.
pub mod access;
pub mod client;
pub mod server;
pub mod types;

//! Test harness of `lb`: network namespaces, a veth topology, real kernel
//! servers and clients, guards for host state, a guard for the `lb` daemon
//! process, a real Docker engine, a real etcd, and a rig for `BPF_PROG_TEST_RUN`.
//!
//! Everything here is meant to be reused by the kernel and end-to-end tests
//! (`tests/tests/`), by `cargo xtask demo` (`lb-demo`) and by the benchmark
//! (`tests/bench/`). All of it needs root (see [`require_root`]); every
//! object it creates (namespace, veth, address, process, file, firewall
//! policy change) is undone by a `Drop` guard, so a panicking test still
//! leaves the host as it found it.
//!
//! Addresses: only 198.18.0.0/15 (RFC 2544 benchmarking range) is used; see
//! [`topology`] for the plan.

#![warn(missing_docs)]

pub mod attach;
pub mod browser;
pub mod clients;
pub mod cmd;
pub mod config_files;
pub mod demo;
pub mod docker_engine;
pub mod etcd;
pub mod forward;
pub mod lb_process;
pub mod load;
pub mod lock;
pub mod netns;
pub mod nodes;
pub mod ops;
pub mod packets;
pub mod reliability;
pub mod servers;
pub mod stream;
pub mod tempdir;
pub mod topology;

pub use attach::{attachments, Attachments};
pub use clients::{
    http_get, http_get_here, http_tally, udp_roundtrip, udp_roundtrip_here, udp_tally, HttpTally,
    UdpReply, UdpTally, CLIENT_TIMEOUT,
};
pub use cmd::{output_with_timeout, run, run_ok};
pub use config_files::{render_config, ServiceConfig};
pub use forward::{forward_policy, ForwardDrop};
pub use lb_process::{lb_binary, Daemon, READY_MARKER};
pub use netns::Netns;
pub use servers::{HttpServer, UdpEcho};
pub use tempdir::TempDir;
pub use topology::Topology;

/// Panics with a clear message unless the process runs as root (effective
/// uid 0). Tests call it first: a missing prerequisite must fail a test, not
/// skip it.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root (network namespaces, veths, iptables, BPF); \
             run it as root, e.g. `sudo -E cargo test -p lb-tests`"
        );
    }
}

//! `lb`: an XDP/TC load balancer for containers. See README.md.
//!
//! `lb run` is the daemon; every other command is a client of its admin API
//! (`lb::cli`).

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use lb::{
    cli::{self, Cli, Command},
    daemon, privileges,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run_daemon(args),
        // No tracing subscriber: a client prints its result or one error line.
        Command::Admin(command) => cli::run(command, &cli.socket),
    }
}

/// The daemon's log filter when `RUST_LOG` is unset. netlink-packet-route
/// warns at every link it parses on a kernel newer than itself (an
/// attribute longer than it knows); that says nothing about lb and came
/// once per backend resolved, so only its errors are shown.
const DEFAULT_LOG_FILTER: &str = "info,netlink_packet_route=error";

fn run_daemon(args: daemon::RunArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Before any other thread starts: the kernel moves only a single-threaded
    // process to another mount namespace.
    match lb::host::mountns::share_host_bpffs() {
        Ok(true) => tracing::info!(
            "started in a mount namespace of its own (ip netns exec?): pins go to the host's bpffs, so they outlive the daemon"
        ),
        Ok(false) => {}
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            return ExitCode::FAILURE;
        }
    }
    // Before the runtime starts any thread (capabilities are per thread).
    match privileges::drop_to_kept() {
        Ok(kept) => tracing::info!(?kept, "capabilities dropped but those kept"),
        Err(e) => tracing::warn!(error = %e, "running with every capability it was started with"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `lb`: an XDP/TC load balancer for containers. See README.md.

use std::{io::IsTerminal, process::ExitCode};

use clap::{Parser, Subcommand};
use lb::daemon;
use tracing_subscriber::EnvFilter;

/// XDP/TC load balancer: DNAT to backends held in BPF maps.
#[derive(Debug, Parser)]
#[command(name = "lb", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground: load and attach the data path, keep
    /// its maps in step with the config, detach on SIGINT/SIGTERM.
    Run(daemon::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => daemon::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

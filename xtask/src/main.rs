//! The project's harness: `cargo xtask <command>` (the alias is in
//! `.cargo/config.toml`).
//!
//! xtask depends on nothing in the workspace: it is built before bpf-linker
//! exists, and its first job (`setup`) is to make the machine able to build
//! the rest. Each subcommand lives in its own module; to add one, add a
//! variant to [`Command`] and a line to `main`'s match.

mod bench;
mod build;
mod cmd;
mod demo;
mod fuzz;
mod lint;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Build, lint, test, demo and benchmark lb"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing lb needs: Debian packages, the
    /// nightly's rust-src, bpf-linker (into .tools/) and a bpffs mount.
    /// Idempotent; a second run only checks.
    Setup,
    /// Build the release `lb` binary with its eBPF data path
    /// (target/release/lb).
    Build,
    /// rustfmt check and clippy with -D warnings, host and eBPF targets.
    Lint,
    /// Everything CI runs: setup, build, lint, unit tests, then the kernel
    /// and end-to-end tests (needs root).
    Test(test::Args),
    /// Build, make a client namespace and three backends, run lb, send
    /// requests and print how they were spread; cleans up (needs root).
    Demo,
    /// Measure the data path (needs root); writes target/bench/report.{json,md}.
    Bench(bench::Args),
    /// Fuzz the data path: generated frames through both programs with
    /// BPF_PROG_TEST_RUN, every one checked (needs root); a failing frame
    /// is saved under tests/fixtures/fuzz/.
    Fuzz(fuzz::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Build => build::run(),
        Command::Lint => lint::run(),
        Command::Test(args) => test::run(&args),
        Command::Demo => demo::run(),
        Command::Bench(args) => bench::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes, without a backtrace: the failing command
            // line is in it, and its output is just above.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
